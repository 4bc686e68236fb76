"""The options of ``probe()``, checked before anything is installed, and the store metadata that records them."""

from __future__ import annotations

import os
import platform

import torch

from .._version import __version__
from ..errors import ProbeError
from .joint import JOINT_MODES
from .rows import as_texts
from .sink import AGGREGATES

__all__ = ["PASSES", "HEADS", "MAP_DTYPES", "check_options", "capture_meta"]

PASSES = ("cond", "uncond", "all")
HEADS = ("keep", "mean")
#: the dtypes a probe keeps its maps in (those a store's load verifies: 16- to 64-bit floats)
MAP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_options(passes, heads, dtype, device, prompts, joint, aggregate, stream_to=None, relations=None) -> None:
    """Raise ``ProbeError`` naming the first of ``probe()``'s options that is not one it takes (see ``probe``)."""
    if passes not in PASSES:
        raise ProbeError(f"passes={passes!r} is not one of {PASSES}")
    if heads not in HEADS:
        raise ProbeError(f"heads={heads!r} is not one of {HEADS}")
    if dtype not in MAP_DTYPES:  # float8 maps would be written, then refused by every load (their values checked)
        raise ProbeError(f"dtype={dtype!r} is not a dtype the maps are kept in: one of "
                         f"{', '.join(map(str, MAP_DTYPES))}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ProbeError(f"device={device!r} is not a torch device: {exc}") from None
    if torch.device(device).type not in ("cpu", "cuda", "mps", "xpu"):  # meta: maps without values
        raise ProbeError(f"device={device!r} cannot hold the maps' values: keep them on 'cpu' or a GPU ('cuda')")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ProbeError(f"device={device!r}, but this torch sees no CUDA device: keep the maps on 'cpu'")
    if prompts is not None and as_texts(prompts) is None:
        raise ProbeError(f"prompts must be a string or a list of strings; got {type(prompts).__name__}")
    if joint not in JOINT_MODES:
        raise ProbeError(f"joint={joint!r} is not one of {JOINT_MODES}")
    if aggregate not in (None, *AGGREGATES):
        raise ProbeError(f"aggregate={aggregate!r} is not one of None, {', '.join(map(repr, AGGREGATES))}")
    if stream_to is not None and (not isinstance(stream_to, (str, os.PathLike)) or isinstance(stream_to, bytes)):
        raise ProbeError(f"stream_to={stream_to!r} is not a folder path: give a str or pathlib.Path (or None: in memory)")
    if relations is not None and (aggregate is not None or stream_to is not None):
        raise ProbeError(f"relations={relations!r} are kept in memory, a map per call: not with "
                         f"{'aggregate=' if aggregate is not None else 'stream_to='}; open a second probe for them")


def capture_meta(pipe, denoiser, family: str, *, passes, heads, dtype, sites, calls, tokens, aggregate, stream_to,
                 joint) -> dict:
    """A new store's metadata: pipeline and denoiser (class, family, config), library versions and the probe's
    options (``capture``; ``joint`` only when some site is not plain cross-attention, else ``None``)."""
    import diffusers
    import transformers

    return {
        "pipeline": type(pipe).__name__ if pipe is not None else None,
        "denoiser": type(denoiser).__name__,
        "family": family,
        "denoiser_config": {k: v for k, v in dict(getattr(denoiser, "config", {})).items() if not k.startswith("_")},
        "versions": {
            "attnprobe": __version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "capture": {
            "passes": passes,
            "heads": heads,
            "dtype": str(dtype).removeprefix("torch."),
            "sites": [s.name for s in sites],
            "calls": None if calls is None else repr(calls),
            "tokens": None if tokens is None else list(tokens),
            "aggregate": aggregate,
            "stream_to": None if stream_to is None else str(stream_to),
            **({"joint": joint} if joint is not None else {}),
        },
    }
