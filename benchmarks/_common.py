"""Shared by the benchmark scripts: alternating timing pairs, peak RSS of a child process, the table."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def pairs(plain: Callable, probed: Callable, repeats: int, sync: Callable[[], None] = lambda: None) -> dict:
    """Warm both up, then time ``repeats`` alternating (plain, probed) pairs in this process: machine noise hits
    both sides alike. The ratio is taken per pair, then the median."""
    plain(), probed()
    plain_t, probed_t, ratios, result = [], [], [], None
    for _ in range(repeats):
        a, _ = timed(plain, sync)
        b, result = timed(probed, sync)
        plain_t.append(a)
        probed_t.append(b)
        ratios.append(b / a)
    return {"plain_s": statistics.median(plain_t), "probed_s": statistics.median(probed_t),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "result": result}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(script: str, *args: str) -> dict:
    """Run ``script --child args…`` in a fresh interpreter (its own peak RSS) and return the JSON it prints last."""
    out = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:  # one failed row must not lose the others' minutes of timing
        print(f"child {args} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return {"case": f"{args[1] if len(args) > 1 else args[0]}: FAILED (see stderr)"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (key, heading, format); missing values print as ``-``."""
    widths = [max(len(head), 8) for _, head, _ in columns]
    first = max([len(columns[0][1])] + [len(str(row.get(columns[0][0], ""))) for row in rows])
    print("  ".join(head.rjust(w) if i else head.ljust(first) for i, ((_, head, _), w) in enumerate(zip(columns, widths))))
    for row in rows:
        cells = []
        for i, ((key, _, fmt), w) in enumerate(zip(columns, widths)):
            value = row.get(key)
            text = "-" if value is None else (format(value, fmt) if fmt else str(value))
            cells.append(text.ljust(first) if i == 0 else text.rjust(w))
        print("  ".join(cells))


def generate(pipe, size: int, steps: int, prompt="a picture of dog", seed: int = 0, guidance: float = 7.5):
    import torch

    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                output_type="latent", generator=torch.Generator().manual_seed(seed)).images


def measure(pipe, size: int, steps: int, probe_kwargs: dict, repeats: int, sync=lambda: None,
            guidance: float = 7.5) -> dict:
    """One row: plain vs probed generations in alternating pairs; store bytes vs the values it keeps."""
    import shutil
    import tempfile
    from pathlib import Path

    import torch

    import attnprobe

    probe_kwargs = dict(probe_kwargs)
    stream = probe_kwargs.pop("stream", False)
    root = Path(tempfile.mkdtemp()) if stream else None

    def probed():
        kwargs = dict(probe_kwargs)
        if stream:
            target = root / f"s{len(list(root.iterdir()))}"
            kwargs["stream_to"] = target
        with attnprobe.probe(pipe, **kwargs) as store:
            out = generate(pipe, size, steps, guidance=guidance)
        return store, out

    try:
        row = pairs(lambda: generate(pipe, size, steps, guidance=guidance), probed, repeats, sync)
        store, probed_out = row.pop("result")
        plain_out = generate(pipe, size, steps, guidance=guidance)
        row["identical"] = bool(torch.equal(plain_out, probed_out))  # the images (latents) bit for bit
        values = sum(store.maps(s).numel() for s in store.site_names)
        dtype = probe_kwargs.get("dtype", torch.float16)
        row.update(store_mb=store.nbytes / 1e6, values_mb=values * torch.finfo(dtype).bits / 8 / 1e6,
                   calls=len(store.calls), rss_mb=peak_rss_mb())
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    return row
