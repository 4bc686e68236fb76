"""The probe on a GPU at full size: SD 1.5 at 512 px and SDXL at 1024 px, built from their real configs with
seeded random weights (``attnprobe.testing.full_size_pipeline``: the timings and memory of the real weights,
no download). A prepared script for a device machine; about 4 minutes on one H100/H200 class GPU.

    python benchmarks/gpu.py                   # the table (fp16, 20 steps, 5 pairs per row)
    python benchmarks/gpu.py --compile         # also: torch.compile (inductor) rows, recompiles after warm-up
    python benchmarks/gpu.py --device cpu --size-scale 0.125 --steps 2 --repeats 1   # smoke test on a CPU

Timed rows alternate plain and probed generations in one process (median of the per-pair ratios) with
``torch.cuda.synchronize()`` around each; maps are computed on the GPU and copied to pinned host memory without
synchronising (``probe(device="cpu")``, the default). "bytes/call" is the store's bytes per denoiser call; peak
GPU memory is ``torch.cuda.max_memory_allocated`` over the row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import measure, pairs, print_table, generate  # noqa: E402

ROWS = [  # (model, native px, probe options)
    ("sd15", 512, dict(heads="mean")),
    ("sd15", 512, dict(heads="keep")),
    ("sd15", 512, dict(heads="mean", passes="all")),
    ("sd15", 512, dict(heads="mean", tokens="dog")),
    ("sd15", 512, dict(heads="mean", aggregate="mean")),
    ("sd15", 512, dict(heads="mean", stream=True)),
    ("sdxl", 1024, dict(heads="mean")),
    ("sdxl", 1024, dict(heads="mean", tokens="dog")),
    ("sdxl", 1024, dict(heads="mean", stream=True)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size-scale", type=float, default=1.0, help="multiply the native sizes (smoke tests)")
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (inductor) rows")
    args = parser.parse_args()
    from attnprobe.testing import full_size_pipeline

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --device cpu for a smoke test")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.float16 if cuda else torch.float32
    rows, t_start = [], time.time()
    for model in args.models.split(","):
        t0 = time.time()
        pipe = full_size_pipeline(model, device=args.device, dtype=dtype)
        print(f"built {model} in {time.time() - t0:.0f} s", file=sys.stderr)
        for name, native, options in (r for r in ROWS if r[0] == model):
            size = max(64, int(native * args.size_scale) // 64 * 64)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            row = measure(pipe, size, args.steps, options, args.repeats, sync)
            label = ", ".join(f"{k}={v}" for k, v in options.items())
            row.update(case=f"{model} {label}", px=size, bytes_per_call=row["store_mb"] * 1e6 / max(row["calls"], 1),
                       gpu_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None)
            rows.append(row)
            print(f"  {row['case']} {size}px: ×{row['ratio']:.3f} ({time.time() - t_start:.0f} s)", file=sys.stderr)
        if args.compile:
            rows.append(compiled_row(pipe, model, max(64, int((512 if model == "sd15" else 1024) * args.size_scale)),
                                     args.steps, args.repeats, sync))
        del pipe
        if cuda:
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{name}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')} weights, {args.steps} steps, "
          f"guidance 7.5, fp16 maps to the CPU; median of {args.repeats} alternating pairs; {time.time() - t_start:.0f} s")
    print_table(rows, [("case", "case", ""), ("px", "px", "d"), ("plain_s", "plain s", ".3f"),
                       ("probed_s", "probed s", ".3f"), ("ratio", "ratio", ".3f"), ("store_mb", "store MB", ".1f"),
                       ("values_mb", "values MB", ".1f"), ("bytes_per_call", "bytes/call", ".3g"),
                       ("gpu_gb", "peak GPU GB", ".1f"), ("rss_mb", "peak RSS MB", ".0f"),
                       ("recompiles", "recompiles", "d")])


def compiled_row(pipe, model, size, steps, repeats, sync) -> dict:
    """torch.compile (inductor) of the UNet; warm-up compiles the plain and the probed variant; recompiles
    are counted over the timed pairs that follow."""
    import attnprobe
    from torch._dynamo.utils import counters

    pipe.unet.compile()

    def probed():
        with attnprobe.probe(pipe, heads="mean") as store:
            generate(pipe, size, steps)
        return store

    t0 = time.time()
    for _ in range(2):
        generate(pipe, size, steps), probed()
    sync()
    graphs = counters["stats"]["unique_graphs"]
    row = pairs(lambda: generate(pipe, size, steps), probed, repeats, sync)
    row.pop("result")
    row.update(case=f"{model} compiled (inductor), heads=mean; warm-up {time.time() - t0:.0f} s", px=size,
               recompiles=counters["stats"]["unique_graphs"] - graphs)
    return row


if __name__ == "__main__":
    main()
