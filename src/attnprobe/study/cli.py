"""Command line: ``attnprobe study …`` (the main job) and ``attnprobe sites …``.

    attnprobe study --model tiny --out out/study
    attnprobe study --concepts "dog,Van Gogh" --variants baseline,instruction --seeds 0,1 --steps 4
    attnprobe study --interventions "zero-attention,negative-prompt,early=zero-attention:calls=0-3"
    attnprobe study --config study.toml                       # resumable; run it again after a crash
    accelerate launch -m attnprobe study --config study.toml  # the grid split across processes (GPUs)
    attnprobe sites --model tiny
    attnprobe report out/study                                # rewrite out/study/report.html (nothing generated)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from .._version import __version__
from ..capture import list_sites
from ..errors import AttnprobeError
from ..interventions import INTERVENTIONS
from ..models.loader import load_pipeline
from ..models.tiny import TINY_PIPELINES
from . import run
from .page import rewrite_page
from .config import DTYPES, load_config
from .variants import DEFAULT_CONCEPTS, DEFAULT_VARIANTS, SHAPES_CONCEPTS

__all__ = ["main"]


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(p) for p in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas; got {text!r}") from None


def _dtype(text: str):
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(DTYPES)}; got {text!r}")
    return DTYPES[text]


def build_parser() -> argparse.ArgumentParser:
    """The ``attnprobe`` argument parser (subcommands ``study``, ``report`` and ``sites``)."""
    parser = argparse.ArgumentParser(prog="attnprobe", description="Cross-attention probes for diffusers pipelines.")
    parser.add_argument("--version", action="version", version=f"attnprobe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser(
        "study",
        help="concepts × prompt variants × seeds: concept-attention trajectories, AUC, Δ AUC, figures",
        description="Does an unlearning instruction lower the denoiser's attention to a concept? Writes CSVs and "
        "PNGs to --out and prints the summary.",
    )
    st.add_argument("--config", default=None,
                    help="a study file (TOML: models, concepts, variants, interventions, seeds, steps, guidance, size, "
                    "frames, capture, out); the options below override its values")
    st.add_argument("--model", default=None,
                    help="'shapes' (default: offline, trained on coloured shapes: its own concepts, variants and "
                    "scorer), 'tiny' (offline SD 1.5 layout, random weights: plumbing only), 'tiny-xl', or 'tiny-<name>' of "
                    f"{', '.join(TINY_PIPELINES)}, or a hub id / local folder; several separated by commas")
    st.add_argument("--out", default=None, help="output folder (default: attnprobe-study)")
    st.add_argument("--concepts", type=_csv, default=None, help=f"comma-separated (default: {', '.join(DEFAULT_CONCEPTS)}; "
                    f"for --model shapes: {', '.join(SHAPES_CONCEPTS)})")
    st.add_argument("--variants", default=None,
                    help=f"comma-separated names from {list(DEFAULT_VARIANTS)} or name=template with {{c}} (default: all; "
                    "--model shapes has the same names in its own words)")
    st.add_argument("--seeds", type=_seeds, default=None, help="comma-separated integers (default: 0,1,2; 0-7 for the shapes model, the fewest with which its exact test can reach 5%% after Holm)")
    st.add_argument("--steps", type=int, default=None, help="inference steps (default: 10)")
    st.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: 7.5)")
    st.add_argument("--size", type=int, default=None, help="image side in pixels (default: 64 for tiny, else native)")
    st.add_argument("--frames", type=int, default=None,
                    help="video models: decoded frames per video, k·c + 1 for the VAE's temporal compression c (default: "
                    "3 latent frames, 9 for Wan, SkyReels-V2 and CogVideoX)")
    st.add_argument("--device", default=None, help="auto (default: CUDA if available), cpu, cuda, cuda:1 …")
    st.add_argument("--dtype", type=_dtype, default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, else fp32)")
    st.add_argument("--interventions", default=None,
                    help=f"rows beside the variants, comma-separated: names from {list(INTERVENTIONS)}, with options "
                    "name:key=value (e.g. zero-attention:calls=0-3:sites=up_blocks.*), composed with +, labelled "
                    "label=spec (default: none)")
    st.add_argument("--scorer", default=None,
                    help="concept presence in the images: 'auto' (default: 'shapes' for the shapes model, else 'tiny'), "
                    "'shapes' (the shapes model's programmatic checker), 'tiny' (random-weight CLIP, plumbing only), "
                    "'none', or a CLIP hub id / local folder, e.g. openai/clip-vit-large-patch14")
    st.add_argument("--save-maps", action="store_true", default=None,
                    help="also stream every generation's attention maps to OUT/maps/ (AttentionStore.load reads them)")
    st.add_argument("--restart", action="store_true",
                    help="discard the finished generations of an earlier run in --out instead of resuming them")
    st.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    rp = sub.add_parser("report", help="rewrite a study folder's report.html from its cells and tables (nothing generated)",
                        description="Writes DIR/report.html again (and nothing else) from the study's tables, figures "
                        "and cells: the answer first, the tables, the figures and a heat-map browser, in one "
                        "self-contained page.")
    rp.add_argument("dir", help="a study's folder (the --out of attnprobe study)")
    si = sub.add_parser("sites", help="list a model's cross-attention sites")
    si.add_argument("--model", default="tiny", help="'tiny', 'shapes', 'tiny-xl', 'tiny-<name>' of "
                    f"{', '.join(TINY_PIPELINES)}, or a hub id / local folder")
    return parser


#: seeds of a shapes study without --seeds: with n seeds the exact sign-flip test's smallest p is 2/2^n, and Holm over
#: the 3 concepts multiplies it by 3: 8 seeds give 0.023, 6 only 0.094
SHAPES_SEEDS = 8


def _study_arguments(args) -> dict:
    """``study``'s arguments: the config file's values, then every option given on the command line."""
    kwargs = load_config(args.config) if args.config else {}
    flags = dict(model=args.model, out=args.out, concepts=args.concepts, variants=args.variants, seeds=args.seeds,
                 steps=args.steps, guidance=args.guidance, size=args.size, device=args.device, dtype=args.dtype,
                 interventions=args.interventions, scorer=args.scorer, frames=args.frames)
    kwargs.update({k: v for k, v in flags.items() if v is not None})
    kwargs.setdefault("model", "shapes")  # the default study means something: a trained model (tiny: plumbing)
    if kwargs["model"] == "shapes":  # the fewest seeds whose exact test, Holm over its 3 concepts, can reach 5%
        kwargs.setdefault("seeds", list(range(SHAPES_SEEDS)))
    if isinstance(kwargs.get("model"), str):
        kwargs["model"] = _csv(kwargs["model"]) if "," in kwargs["model"] else kwargs["model"]
    if args.save_maps:
        kwargs["capture"] = {**kwargs.get("capture", {}), "save": True}
    return dict(kwargs, progress=not args.no_progress, restart=args.restart)


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:  # already imported by then: the environment variables alone come too late
        import transformers

        transformers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - a transformers without this API
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, docker and kill send before SIGKILL), taken as Ctrl-C is: the study merges what
    finished before it stops."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM stops the cells as Ctrl-C does; while what finished is merged (``run.MERGING``), it is noted and the
    merge ends first. Yields a list that holds the SIGTERMs so noted."""
    noted: list[int] = []

    def stop(signum, frame):
        if run.MERGING.is_set():
            noted.append(signum)
            os.write(2, b"attnprobe: SIGTERM: the merge of what finished ends first (SIGKILL stops at once)\n")
            return
        raise _Terminated("terminated (SIGTERM)")

    try:
        before = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        yield noted
        return
    try:
        yield noted
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``attnprobe`` command. Returns the exit status (2 on a user error; 130 after Ctrl-C and
    143 after SIGTERM, once the study has merged what finished)."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "study":
            with _terminate_as_interrupt() as noted:
                result = run.study(**_study_arguments(args))
            if noted:
                print("attnprobe: terminated (SIGTERM) while merging, once the merge had ended", file=sys.stderr)
                return 143
            return 1 if result.failures and not result.aucs else 0
        if args.command == "report":
            print(f"wrote {rewrite_page(args.dir)}")
            return 0
        if args.command == "sites":
            sites = list_sites(load_pipeline(args.model))  # before the header: a load error is the only line
            print("# site\tblock group\tkind (cross, joint, single)\theads\thead_dim")
            for s in sites:
                print(f"{s.name}\t{s.group}\t{s.kind}\theads={s.heads}\thead_dim={s.head_dim}")
            return 0
    except AttnprobeError as exc:
        print(f"attnprobe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"attnprobe: {str(exc) or 'interrupted'}; every finished generation is kept: run the same command again to resume",
              file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
