"""Every pipeline attnprobe can build or load by name: the offline ones (``"shapes"``, the tiny ones), else any hub
id or local folder through ``DiffusionPipeline.from_pretrained``, with a one-line error when it cannot.

    >>> type(load_pipeline("tiny-pixart")).__name__
    'PixArtAlphaPipeline'
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch

from .._quiet import quiet_notes
from ..errors import ModelLoadError
from .tiny import TINY_PIPELINES, tiny_pipeline
from .shapes.model import load as load_shapes

__all__ = ["TINY_MODELS", "OFFLINE_MODELS", "load_pipeline", "check_model_name", "first_line"]

#: Offline pipelines built from configs with seeded weights (``attnprobe.models.tiny``).
TINY_MODELS = ("tiny", "tiny-xl") + tuple(f"tiny-{name}" for name in TINY_PIPELINES)
#: Every model that runs without downloads: the tiny ones and ``"shapes"``, the trained model shipped with attnprobe
#: (``attnprobe.models.shapes``, docs/shapes-model.md).
OFFLINE_MODELS = ("shapes",) + TINY_MODELS


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``"ExcType: first line of its message"``, cut to ``limit`` characters (for one-line errors)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line if len(line) <= limit else line[: limit - 1] + '…'}"


def check_model_name(model: str) -> None:
    """A name that looks like a local path must exist (checked for every model before a study generates)."""
    if model in OFFLINE_MODELS:
        return
    if model.startswith("tiny-") and not Path(model).exists():  # a tiny pipeline's name, mistyped
        close = difflib.get_close_matches(model, OFFLINE_MODELS, n=1)
        raise ModelLoadError(f"no offline model {model!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; there are {', '.join(OFFLINE_MODELS)}")
    looks_local = model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 2)[-1]
    if looks_local and not Path(model).expanduser().exists():
        raise ModelLoadError(f"could not load model {model!r}: no such folder (and it is not a hub id)")


@quiet_notes()
def load_pipeline(model: str = "tiny", device: str = "cpu", dtype: torch.dtype | None = None):
    """A pipeline by name: ``"shapes"`` (the trained shapes model shipped with attnprobe, 32 px), ``"tiny"`` (SD 1.5 layout), ``"tiny-xl"`` (SDXL layout), ``"tiny-sd3"`` (SD3: joint
    attention, CLIP + T5 keys) or ``"tiny-flux"`` (Flux: double- and single-stream blocks, T5 keys) or ``"tiny-pixart"`` (PixArt-α:
    cross-attention to masked T5 keys), or any ``"tiny-<name>"`` of ``attnprobe.testing.TINY_PIPELINES``, built offline,
    else any hub id or local folder through ``DiffusionPipeline.from_pretrained``.

    Raises:
        ModelLoadError: the model could not be loaded (offline, unknown id, missing files), in one line.
    """
    if model == "shapes":
        return load_shapes(dtype or torch.float32, device)
    if model in TINY_MODELS:
        name = {"tiny": "sd", "tiny-xl": "sdxl"}.get(model, model.removeprefix("tiny-"))
        return tiny_pipeline(name, dtype=dtype or torch.float32).to(device)
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    check_model_name(model)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its offline retries print several lines before the error
    try:
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load model {model!r} ({first_line(exc)}). Real checkpoints need their weights on this "
            "machine (a local folder or the hub cache) or network access to the hub; offline, use --model shapes (trained) or tiny (random weights)."
        ) from None
    finally:
        diffusers_logging.set_verbosity(level)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
