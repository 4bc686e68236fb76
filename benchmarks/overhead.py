"""Probe overhead and store size on SD 1.5- and SDXL-shaped pipelines built from configs (CPU, no downloads).

    .venv/bin/python benchmarks/overhead.py            # the full table (a few minutes on 2 cores)
    .venv/bin/python benchmarks/overhead.py --quick    # fewer repeats

Each row times plain and probed generations alternately in one process (median of N pairs; the ratio is
taken per pair, then the median), so machine noise hits both sides alike. Store bytes are compared with the
information kept (values × dtype size). Peak RSS is the process's maximum resident size so far.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import attnprobe
from attnprobe.testing import SD15_UNET, SDXL_UNET


def sd15_shaped(seed=0):
    """SD 1.5's real block layout (16 sites, 8 heads, 4 resolutions) with narrow channels."""
    from diffusers import UNet2DConditionModel

    from attnprobe.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed)
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel(**dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
                                            attention_head_dim=8), norm_num_groups=8).eval()
    return pipe


def sdxl_shaped(seed=0):
    from attnprobe.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed)


def run(pipe, size, steps, probe_kwargs=None):
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="latent",
              generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    if probe_kwargs is None:
        pipe("a picture of dog", **kw)
        return time.perf_counter() - t0, None
    with attnprobe.probe(pipe, **probe_kwargs) as store:
        pipe("a picture of dog", **kw)
    return time.perf_counter() - t0, store


def row(name, pipe, size, steps, repeats, **probe_kwargs):
    run(pipe, size, steps)  # warm-up
    run(pipe, size, steps, probe_kwargs)
    ratios, plain_t, probed_t = [], [], []
    for _ in range(repeats):
        a, _ = run(pipe, size, steps)
        b, store = run(pipe, size, steps, probe_kwargs)
        plain_t.append(a)
        probed_t.append(b)
        ratios.append(b / a)
    values = sum(store[n].numel() for n in store)
    info = values * torch.finfo(probe_kwargs.get("dtype", torch.float16)).bits // 8
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (name, size, statistics.median(plain_t), statistics.median(probed_t), statistics.median(ratios),
            store.nbytes, info, rss)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 pairs per row instead of 7")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    repeats = 3 if args.quick else 7
    sd, xl = sd15_shaped(), sdxl_shaped()
    rows = [
        row("SD1.5-shaped, cond, head mean", sd, 256, args.steps, repeats, heads="mean"),
        row("SD1.5-shaped, cond, head mean", sd, 64, args.steps, repeats, heads="mean"),
        row("SD1.5-shaped, cond, heads keep", sd, 256, args.steps, repeats, heads="keep"),
        row("SD1.5-shaped, all passes, mean", sd, 256, args.steps, repeats, heads="mean", passes="all"),
        row("SDXL-shaped, cond, head mean", xl, 256, args.steps, repeats, heads="mean"),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, guidance 7.5, "
          f"median of {repeats} alternating pairs")
    head = f"{'case':<34}{'px':>5}{'plain s':>9}{'probed s':>10}{'ratio':>7}{'store MB':>10}{'values MB':>10}{'RSS MB':>8}"
    print(head)
    print("-" * len(head))
    for name, size, a, b, r, nbytes, info, rss in rows:
        print(f"{name:<34}{size:>5}{a:>9.3f}{b:>10.3f}{r:>7.3f}{nbytes / 1e6:>10.2f}{info / 1e6:>10.2f}{rss:>8.0f}")


if __name__ == "__main__":
    main()
