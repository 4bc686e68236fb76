"""The options of ``probe()``, checked before anything is installed."""

from __future__ import annotations

import torch

from ..errors import ProbeError
from .joint import JOINT_MODES
from .rows import as_texts
from .sink import AGGREGATES

__all__ = ["PASSES", "HEADS", "check_options"]

PASSES = ("cond", "uncond", "all")
HEADS = ("keep", "mean")


def check_options(passes, heads, dtype, device, prompts, joint, aggregate) -> None:
    """Raise ``ProbeError`` naming the first of ``probe()``'s options that is not one it takes (see ``probe``)."""
    if passes not in PASSES:
        raise ProbeError(f"passes={passes!r} is not one of {PASSES}")
    if heads not in HEADS:
        raise ProbeError(f"heads={heads!r} is not one of {HEADS}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ProbeError(f"dtype={dtype!r} is not a floating-point torch.dtype (e.g. torch.float16)")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ProbeError(f"device={device!r} is not a torch device: {exc}") from None
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ProbeError(f"device={device!r}, but this torch sees no CUDA device: keep the maps on 'cpu'")
    if prompts is not None and as_texts(prompts) is None:
        raise ProbeError(f"prompts must be a string or a list of strings; got {type(prompts).__name__}")
    if joint not in JOINT_MODES:
        raise ProbeError(f"joint={joint!r} is not one of {JOINT_MODES}")
    if aggregate not in (None, *AGGREGATES):
        raise ProbeError(f"aggregate={aggregate!r} is not one of None, {', '.join(map(repr, AGGREGATES))}")
