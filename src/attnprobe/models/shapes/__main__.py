"""``python -m attnprobe.models.shapes train|evaluate``: train the shapes model from nothing, or measure it against
its targets (docs/shapes-model.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...capture.passes import check_guidance
from ...errors import ArgumentError, AttnprobeError
from .evaluate import evaluate
from .model import train


def main(argv=None) -> int:
    """``python -m attnprobe.models.shapes train|evaluate …``: train the shapes model, or measure it against its targets."""
    parser = argparse.ArgumentParser(prog="python -m attnprobe.models.shapes",
                                     description="Train or evaluate attnprobe's shapes model (docs/shapes-model.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train from nothing on CPU (seeded) and write a pipeline folder")
    tr.add_argument("--out", default="shapes-model", help="output folder (default: shapes-model)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--scenes", type=_positive, default=30000, help="training scenes (default 30000)")
    tr.add_argument("--vae-steps", type=_positive, default=1000, help="autoencoder steps (default 1000)")
    tr.add_argument("--unet-steps", type=_positive, default=4500, help="denoiser steps (default 4500)")
    tr.add_argument("--batch", type=_positive, default=64, help="denoiser batch (default 64)")
    tr.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default 2)")
    tr.add_argument("--overwrite", action="store_true", help="train into a folder that already holds a run")
    ev = sub.add_parser("evaluate", help="measure caption following and heat-map localisation (writes JSON)")
    ev.add_argument("--model", default="shapes", help="'shapes' (the shipped weights, default) or a pipeline folder")
    ev.add_argument("--out", default="shapes-eval.json", help="JSON file of every figure (default: shapes-eval.json)")
    ev.add_argument("--captions", type=_positive, default=200,
                    help="captions for caption following (default 200; a quarter, at least 20, are held-out pairs, "
                    "and half, at least 20, run at the study's settings)")
    ev.add_argument("--scenes", type=_positive, default=60, help="real scenes for localisation (default 60)")
    ev.add_argument("--generated", type=_positive, default=40, help="generations for localisation (default 40)")
    ev.add_argument("--steps", type=_positive, default=20, help="inference steps (default 20)")
    ev.add_argument("--guidance", type=_guidance, default=4.0, help="classifier-free guidance scale (default 4)")
    ev.add_argument("--no-baseline", action="store_true", help="skip the random-weight baseline")
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            folder = train(args.out, seed=args.seed, scenes=args.scenes, vae_steps=args.vae_steps,
                           unet_steps=args.unet_steps, batch=args.batch, threads=args.threads,
                           overwrite=args.overwrite)
        except (AttnprobeError, OSError) as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
        print(f"wrote {folder}")
        return 0
    out = Path(args.out).expanduser()
    if out.is_dir() or not out.parent.is_dir():
        parser.exit(2, f"{parser.prog}: error: --out {args.out!r} must be a file in an existing folder\n")
    try:
        result = evaluate(args.model, args.out, captions=args.captions, scenes=args.scenes, generated=args.generated,
                          steps=args.steps, guidance=args.guidance, baseline=not args.no_baseline)
    except (AttnprobeError, OSError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(_evaluation_table(result))
    print(f"wrote {args.out}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1; got {value}")
    return value


def _guidance(text: str) -> float:
    try:
        return check_guidance(text)
    except ArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _evaluation_table(result: dict) -> str:
    """The evaluation's figures as the tables of docs/shapes-model.md (the JSON file holds every number)."""
    lines = ["caption following          n   colour   shape  position   count     all"]
    following = [("training distribution", result["following"]), ("held-out pairs", result["following_held_out"]),
                 ("study settings (10, 7.5)", result["following_study_settings"])]
    if "random" in result:
        following.append(("random weights", result["random"]["following"]))
    for label, r in following:
        lines.append(f"{label:<24}{r['n']:>5}" + "".join(f"{r[k]:>8.1%}" for k in ("colour", "shape", "position",
                                                                                    "count", "all")))
    lines.append("localisation (word)        IoU  IoU@0.5    peak    mass    area  IoU other")
    rows = [("real", result["localisation_real"]["all"]), ("generated", result["localisation_generated"])]
    if "random" in result:
        rows.append(("random weights", result["random"]["localisation_real"]["all"]))
    for label, r in rows:
        for kind in ("colour", "shape"):
            if kind in r:
                v = r[kind]
                lines.append(f"{label + ' (' + kind + ')':<24}{v['iou']:>7.2f}{v['iou_thr']:>9.2f}{v['peak']:>8.0%}"
                             f"{v['mass']:>8.1%}{v['area']:>8.1%}{v.get('iou_other', float('nan')):>11.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
