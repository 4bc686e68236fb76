"""What verifying a store costs: SHA-256 and BLAKE2b rates in hashlib, and AttentionStore.load with and without
``verify`` on a saved file and a streamed folder of the same maps, in seconds per GB of maps (CPU, no downloads).

    .venv/bin/python benchmarks/integrity.py             # a 1 GB store (fp16 maps), 3 repeats: about a minute
    .venv/bin/python benchmarks/integrity.py --gb 0.25   # smaller

The store is synthetic (16 sites, 2 heads, 32×32 grid, 77 tokens, fp16; as many calls as make ``--gb``), written to
a temporary folder (so the files sit in the page cache: the times are the CPU's, not the disk's). Every load is
timed alternately with and without ``verify`` (median of the repeats, ratio per pair), so that machine noise hits
both alike. "load s" reads every map once without ``verify`` (a saved file's maps are memory-mapped: every page is
touched once; a streamed folder's are read on access), "verify s" the same with ``verify=True``; "verify s/GB" is
what verifying adds per GB of maps: reading each map for the hash, the hash, and the value checks (finite, in
[0, 1], NaN only as whole samples), the last two timed alone on the last line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, timed  # noqa: E402

SITES, HEADS, GRID, TOKENS = 16, 2, 32, 77


def hash_rate(name: str, data: bytes, repeats: int) -> float:
    """Seconds per GB of ``hashlib.new(name)`` over ``data`` (median of ``repeats``)."""
    times = []
    for _ in range(repeats):
        h = hashlib.new(name)
        t0 = time.perf_counter()
        h.update(data)
        h.hexdigest()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / (len(data) / 1e9)


def build(gb: float):
    """A synthetic store of about ``gb`` GB of fp16 maps, and its folder streamed the way a probe writes one."""
    from attnprobe.store import AttentionStore, Call
    from attnprobe.testing import synthetic_store

    per_call = SITES * HEADS * GRID * GRID * TOKENS * 2
    calls = max(1, round(gb * 1e9 / per_call))
    base = synthetic_store(calls=1, grid=(GRID, GRID), heads=HEADS, sites=SITES)
    one = {n: base[n][0].half() for n in base}  # [sample, head, qh, qw, token]
    maps = {n: m.unsqueeze(0).expand(calls, *m.shape).contiguous() for n, m in one.items()}
    call_list = [Call(i, float(999 - i), 0, ("cond",)) for i in range(calls)]
    store = AttentionStore(base.sites, call_list, base.samples, [base.layout(0)], maps, dict(base.meta))
    return store, one, call_list


def stream(folder: Path, store, one, calls):
    from attnprobe.store import StoreWriter

    writer = StoreWriter(store.sites, dict(store.meta), folder)
    writer.set_samples(store.samples, [store.layout(0)])
    for call in calls:
        writer.append(call, one)
    writer.store.meta["complete"] = True
    writer.finish(store.sites)


def load_pairs(path: Path, repeats: int) -> dict:
    """Alternate loads with and without ``verify``; a streamed store's maps are read in both (``verify=False`` reads
    them on access, as a user would), so the difference is the verification alone."""
    from attnprobe import AttentionStore

    def read(verify):
        store = AttentionStore.load(path, verify=verify)
        for name in store.site_names:  # a saved file's maps are memory-mapped: touch every page once
            store[name].reshape(-1)[::2048].float().sum()
        return store

    read(True), read(False)
    plain, checked, ratios = [], [], []
    for _ in range(repeats):
        a, _ = timed(lambda: read(False))
        b, _ = timed(lambda: read(True))
        plain.append(a)
        checked.append(b)
        ratios.append(b / a)
    return {"plain_s": statistics.median(plain), "verify_s": statistics.median(checked),
            "ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GB of maps in the store (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the figure a loading process gets without competing for threads
    data = os.urandom(256 * 2**20)
    print(f"hashlib on 256 MiB: sha256 {hash_rate('sha256', data, args.repeats):.3f} s/GB, "
          f"blake2b {hash_rate('blake2b', data, args.repeats):.3f} s/GB (attnprobe uses sha256)")
    del data
    store, one, calls = build(args.gb)
    gb = store.nbytes / 1e9
    root = Path(tempfile.mkdtemp())
    rows = []
    try:
        t, _ = timed(lambda: store.save(root / "store.safetensors"))
        stream(root / "streamed", store, one, calls)
        for name, path in (("saved file", root / "store.safetensors"), ("streamed folder", root / "streamed")):
            row = load_pairs(path, args.repeats)
            rows.append({"name": f"{name}, {gb:.2f} GB, {len(calls)} calls", **row,
                         "per_gb": (row["verify_s"] - row["plain_s"]) / gb,
                         "rate": gb / max(row["verify_s"] - row["plain_s"], 1e-9)})
        print_table(rows, [("name", "store", ""), ("plain_s", "load s", ".2f"), ("verify_s", "verify s", ".2f"),
                           ("ratio", "ratio", ".2f"), ("per_gb", "verify s/GB", ".3f"), ("rate", "GB/s", ".2f")])
        from attnprobe.store.integrity import check_values, digest_maps

        maps = {n: store[n] for n in store}
        t_hash, _ = timed(lambda: digest_maps(maps))
        t_values, _ = timed(lambda: [check_values("x", n, t) for n, t in maps.items()])
        print(f"of which: sha256 of the maps {t_hash / gb:.3f} s/GB, value checks {t_values / gb:.3f} s/GB; "
              f"save (hash included) {t / gb:.3f} s/GB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
