"""Probe overhead, store size, peak memory and torch.compile recompiles on SD 1.5- and SDXL-shaped pipelines
built from configs (CPU, no downloads, random weights: the timings do not depend on the weights).

    .venv/bin/python benchmarks/overhead.py            # the full table (about 15 minutes on 2 idle cores)
    .venv/bin/python benchmarks/overhead.py --quick    # 5 pairs per row instead of 9, fewer generations
    .venv/bin/python benchmarks/overhead.py --only target --pairs 15   # the two target rows (256 and 64 px)
    .venv/bin/python benchmarks/overhead.py --breakdown                 # where the target rows' time goes

Every row runs in a fresh interpreter (its own peak RSS). Timed rows alternate plain and probed generations
in one process (median of N pairs; the ratio is taken per pair, then the median), so that machine noise hits
both sides alike. "values MB" is the information kept (values × dtype size); "store MB" what the store holds.
The streaming rows run G generations into one probe: in memory the store grows with G, streamed to a folder
the peak RSS stays flat; "read MB" is the memory a concept's trajectory took to read back from that store.
The SD 1.5-shaped pipeline has SD 1.5's block layout (16 cross-attention sites, 8 heads, 4 resolutions) with
channels (32, 64, 64, 64) so that it runs on 2 CPU cores (head size 4-8; SD 1.5's is 40-160). The probe's
softmax over image positions × 77 tokens × 8 heads does not shrink with the channels while the convolutions
do, so it weighs more here than in the real model: the "×2" and "×4 channels" rows show the trend (benchmarks/gpu.py
measures full size). In the full run (and alone with ``--breakdown``), one line per target row splits its probed
time: the probe's arithmetic timed inside the probe (``child_breakdown``), what its own compute costs in exact mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import generate, in_child, measure, pairs, peak_rss_mb, print_table  # noqa: E402

STEPS = 10
#: name: (model, px, probe options[, steps, guidance]); 10 steps and guidance 7.5 unless said
TIMED = {
    "SD1.5-shaped, cond, head mean, 256 px (target)": ("sd15", 256, dict(heads="mean")),
    "SD1.5-shaped, cond, head mean, 64 px (target)": ("sd15", 64, dict(heads="mean")),
    "SD1.5-shaped ×2 channels, cond, head mean": ("sd15x2", 256, dict(heads="mean")),
    "SD1.5-shaped ×4 channels, cond, head mean": ("sd15x4", 256, dict(heads="mean")),
    "SD1.5-shaped, cond, heads keep": ("sd15", 256, dict(heads="keep")),
    "SD1.5-shaped, all passes, head mean": ("sd15", 256, dict(heads="mean", passes="all")),
    "SD1.5-shaped, tokens='dog', head mean": ("sd15", 256, dict(heads="mean", tokens="dog")),
    "SD1.5-shaped, calls 0-4, head mean": ("sd15", 256, dict(heads="mean", calls=range(5))),
    "SD1.5-shaped, aggregate mean, head mean": ("sd15", 256, dict(heads="mean", aggregate="mean")),
    "SD1.5-shaped, streamed, head mean": ("sd15", 256, dict(heads="mean", stream=True)),
    "SD1.5-shaped, 4 steps, no guidance (few-step)": ("sd15", 256, dict(heads="mean"), 4, 1.0),
    "SD1.5-shaped, 4 steps, no guidance, 64 px (few-step)": ("sd15", 64, dict(heads="mean"), 4, 1.0),
    "SDXL-shaped, cond, head mean": ("sdxl", 256, dict(heads="mean")),
    "SD 1.5 full size (random weights), cond, head mean, 4 steps (real width)": ("sd15full", 256, dict(heads="mean"), 4,
                                                                              7.5),
}
#: pairs for the full-size row (one pair is ~10 s on 2 cores), whatever --quick says
FULL_SIZE_PAIRS = 4


def sd15_shaped(seed=0, width=1):
    """SD 1.5's real block layout (16 sites, 8 heads, 4 resolutions) with narrow channels: (32, 64, 64, 64) ×
    ``width`` (SD 1.5 has (320, 640, 1280, 1280))."""
    from diffusers import UNet2DConditionModel

    from attnprobe.testing import SD15_UNET, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed)
    torch.manual_seed(seed)
    channels = tuple(c * width for c in (32, 64, 64, 64))
    pipe.unet = UNet2DConditionModel(**dict(SD15_UNET, block_out_channels=channels, cross_attention_dim=32,
                                            attention_head_dim=8), norm_num_groups=8).eval()
    return pipe


def sdxl_shaped(seed=0):
    from attnprobe.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed)


def current_rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 1e6


def child_timed(name: str, repeats: int) -> dict:
    model, size, options, *rest = TIMED[name]
    steps, guidance = rest or (STEPS, 7.5)
    widths = {"sd15": 1, "sd15x2": 2, "sd15x4": 4}
    if model == "sd15full":
        from attnprobe.testing import full_size_pipeline

        pipe, repeats = full_size_pipeline("sd15", dtype=torch.float32), FULL_SIZE_PAIRS
    else:
        pipe = sd15_shaped(width=widths[model]) if model in widths else sdxl_shaped()
    return {"case": name, "px": size, "steps": steps, "guidance": guidance,
            **measure(pipe, size, steps, options, repeats, guidance=guidance)}


def child_memory(mode: str, generations: int) -> dict:
    """G generations at 64 px into one probe (heads kept): in memory, or streamed to a folder."""
    import attnprobe

    pipe = sd15_shaped()
    generate(pipe, 64, STEPS)  # warm-up outside the measure
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"stream_to": Path(tmp) / "s"} if mode == "streamed" else {}
        with attnprobe.probe(pipe, heads="keep", **kwargs) as store:
            for seed in range(generations):
                generate(pipe, 64, STEPS, seed=seed)
        peak = peak_rss_mb()
        before = current_rss_mb()
        for generation in range(generations):  # one concept's trajectory in every generation: each call's token rows
            attnprobe.trajectory(store, "dog", generation=generation)
        read = current_rss_mb() - before
        return {"case": f"{mode}, {generations} generation(s), heads keep", "px": 64, "calls": len(store.calls),
                "store_mb": store.nbytes / 1e6, "rss_mb": peak, "read_mb": max(read, 0.0)}


def child_compile(repeats: int) -> dict:
    """torch.compile (dynamo, eager backend on the CPU: the guards are what is measured) with the probe on."""
    import attnprobe
    from torch._dynamo.utils import counters

    pipe = sd15_shaped()
    pipe.unet.compile(backend="eager")

    def probed():
        with attnprobe.probe(pipe, heads="mean") as store:
            generate(pipe, 64, STEPS)
        return store

    for _ in range(2):  # warm-up: both variants compiled
        generate(pipe, 64, STEPS), probed()
    graphs = counters["stats"]["unique_graphs"]
    row = pairs(lambda: generate(pipe, 64, STEPS), probed, repeats)
    row.pop("result")
    return {"case": "compiled UNet (dynamo), cond, head mean", "px": 64, **row,
            "recompiles": counters["stats"]["unique_graphs"] - graphs, "rss_mb": peak_rss_mb()}


def child_breakdown(repeats: int, size: int = 256) -> dict:
    """Where the target row's probed time goes, per generation (median of ``repeats``), against a plain one, each
    part timed inside the probe: the small sites, deferred to the end of each denoiser call (``PendingLogits.finish``:
    their logits, softmax, head mean and cast, all sites together); the per-site path (``attention_probs`` and
    ``reduce_probs``: the large sites, at every call); ``other`` is the rest of the probed generation's extra time
    (hooks, labels, Python per site, the store, the verify-once checks, and the model's own tensors pushed out of the
    caches). Returns seconds per generation (``plain_s``, ``probed_s``, ``deferred_s``, ``per_site_s``, ``other_s``)
    and ``share`` = (deferred + per-site) / plain."""
    import statistics
    import time

    import attnprobe
    from attnprobe.capture import cross, processor

    pipe = sd15_shaped()
    spent: dict[str, float] = {}
    inside: list[str] = []  # the timed parts in progress: a part inside another is counted in the outer one only

    def timing(owner, name, part):
        inner = getattr(owner, name)

        def timed_fn(*args, **kwargs):
            if inside:
                return inner(*args, **kwargs)
            inside.append(part)
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[part] = spent.get(part, 0.0) + time.perf_counter() - t0
                inside.pop()
        setattr(owner, name, timed_fn)

    timing(processor.PendingLogits, "finish", "deferred")
    timing(cross, "attention_probs", "per_site")
    timing(cross, "reduce_probs", "per_site")
    rows: dict[str, list[float]] = {k: [] for k in ("plain", "probed", "deferred", "per_site")}
    generate(pipe, size, STEPS)
    for _ in range(repeats + 1):
        spent.clear()
        t0 = time.perf_counter()
        with attnprobe.probe(pipe, heads="mean"):
            generate(pipe, size, STEPS)
        rows["probed"].append(time.perf_counter() - t0)
        for part in ("deferred", "per_site"):
            rows[part].append(spent.get(part, 0.0))
        t0 = time.perf_counter()
        generate(pipe, size, STEPS)
        rows["plain"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in rows.items()}
    own = med["deferred"] + med["per_site"]
    return {"plain_s": med["plain"], "probed_s": med["probed"], "deferred_s": med["deferred"],
            "per_site_s": med["per_site"], "other_s": med["probed"] - med["plain"] - own, "share": own / med["plain"],
            "px": size}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 pairs per row instead of 9; 30 generations, not 100")
    parser.add_argument("--pairs", type=int, help="alternating pairs per timed row (default 9, 5 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads in every child (default: torch's own, one per core)")
    parser.add_argument("--only", help="run only the timed rows whose name contains this text (no memory rows, no "
                                       "breakdown); e.g. 'target', '64 px', 'few-step'")
    parser.add_argument("--breakdown", action="store_true",
                        help="only the lines that split the target rows' probed time (256 and 64 px)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        kind, *rest = args.child
        row = (child_timed(rest[0], int(rest[1])) if kind == "timed" else child_memory(rest[0], int(rest[1]))
               if kind == "memory" else child_breakdown(*map(int, rest)) if kind == "breakdown"
               else child_compile(int(rest[0])))
        print(json.dumps(row))
        return
    repeats, many = (5, 30) if args.quick else (9, 100)
    repeats = args.pairs or repeats
    threads = ("--threads", str(args.threads)) if args.threads else ()
    chosen = [name for name in TIMED if not args.only or args.only in name] if not args.breakdown else []
    if args.only and not chosen:
        parser.error(f"--only {args.only!r} is in no row's name; the rows: " + "; ".join(TIMED))
    rows = []
    for name in chosen:
        rows.append(in_child(__file__, "timed", name, str(repeats), *threads))
        print(f"  {name}: ×{rows[-1].get('ratio', float('nan')):.3f}", file=sys.stderr)
    if not args.only:
        if not args.breakdown:
            rows.append(in_child(__file__, "compile", str(repeats), *threads))
            for mode, g in (("in memory", 1), ("in memory", many), ("streamed", 1), ("streamed", many)):
                rows.append(in_child(__file__, "memory", mode.split()[-1] if mode == "streamed" else "memory", str(g),
                                     *threads))
                rows[-1]["case"] = f"{mode}, {g} generation(s), heads keep"
        for px in (256, 64):
            split = in_child(__file__, "breakdown", str(repeats), str(px), *threads)
            if "share" not in split:
                continue
            print(f"target row at {px} px, per generation: plain {split['plain_s'] * 1e3:.0f} ms, probed "
                  f"{split['probed_s'] * 1e3:.0f} ms. The probe's arithmetic: the small sites, together at each "
                  f"call's end {split['deferred_s'] * 1e3:.1f} ms + the large sites, one by one "
                  f"{split['per_site_s'] * 1e3:.1f} ms = {split['share']:.1%} of a plain generation; the rest (hooks, "
                  f"labels, Python per site, the checks, the store, the caches) {split['other_s'] * 1e3:.1f} ms")
    if args.breakdown:
        return
    full = f" ({FULL_SIZE_PAIRS} for full size)" if any("full size" in name for name in chosen) else ""
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} thread(s), {os.cpu_count()} cores; "
          f"{STEPS} steps and guidance 7.5 unless said, fp16 maps on the CPU; median of {repeats} alternating pairs"
          f"{full}; range: the lowest and highest pair's ratio (1 = no cost); identical: plain and probed latents bit "
          "for bit")
    for row in rows:
        if "ratio" in row:
            row["range"] = f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"
        if "identical" in row:
            row["identical"] = "yes" if row["identical"] else "NO"
    spread = [r["case"] for r in rows if "ratio" in r and r["ratio_max"] - r["ratio_min"] > 0.3]
    if spread:  # a busy machine: pair ratios this far apart say more about the other jobs than about the probe
        print(f"WARNING: the pair ratios of {len(spread)} row(s) spread by more than 0.3 ({spread[0]}, …): other jobs "
              "shared the cores; rerun on an idle machine before reading these ratios", file=sys.stderr)
    print_table(rows, [("case", "case", ""), ("px", "px", "d"), ("steps", "steps", "d"), ("plain_s", "plain s", ".3f"),
                       ("probed_s", "probed s", ".3f"), ("ratio", "ratio", ".3f"), ("range", "range", ""),
                       ("identical", "identical", ""), ("store_mb", "store MB", ".2f"), ("values_mb", "values MB", ".2f"),
                       ("rss_mb", "peak RSS MB", ".0f"), ("read_mb", "read MB", ".1f"), ("recompiles", "recompiles", "d")])


if __name__ == "__main__":
    main()
