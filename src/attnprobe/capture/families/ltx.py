"""LTX-Video text-to-video (``LTXVideoTransformer3DModel`` in ``LTXPipeline``): each block's ``attn2`` cross-attends
from the video's tokens to T5's positions (through the denoiser's caption projection), after ``norm_q``/``norm_k``
(RMS norm across heads) and without a rotary embedding, with T5's padding mask added to the logits as the denoiser makes
it (``(1 − mask) · −10000``: padded keys get probability 0 in fp32), read at the kernel. The guided batch is
``[uncond, cond]``.

The denoiser is called with packed latents ``[batch, qt·qh·qw, channel]`` and its token grid as the arguments
``num_frames``, ``height`` and ``width``: its rotary embedding gives token ``i`` the position
``unravel(i, (num_frames, height, width))`` (the first axis slowest), in units of its ``patch_size_t`` latent frames and
``patch_size`` latent rows and columns. So the query grid is exactly those three arguments, and the latent video is
``num_frames · patch_size_t`` frames of ``height · patch_size × width · patch_size``; a call whose token count is not
their product (``capture.frames.packed_call_video``), or that gives the grid otherwise (``_grid``), is refused.

Structure alone cannot tell the blocks' two ``LTXAttention`` apart (neither is built as cross-attention; the block
takes ``encoder_hidden_states``): ``transformer_blocks.<i>.attn2`` are the sites, ``attn1`` (video self-attention) is
not (``_site_kind``). Refused: LTX's image-to-video, condition and long multi-prompt pipelines (``capture.passes
.REFUSED``: a timestep per token, or ``video_coords`` in place of the grid) and LTX-2 (``refused``).
"""

from __future__ import annotations

import torch

from ...errors import ProbeError
from .registry import Family, first_text_encoder

__all__ = ["FAMILY"]


def _site_kind(denoiser: torch.nn.Module, name: str, kind: str | None) -> str | None:
    """``transformer_blocks.<i>.attn2`` is cross-attention to the text; every other attention module is not a site."""
    parts = name.split(".")
    return "cross" if len(parts) == 3 and parts[0] == "transformer_blocks" and parts[2] == "attn2" else None


def _count(value) -> int | None:
    """A grid argument as an int (a Python int or a one-element integer tensor), else ``None``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _grid(denoiser, kwargs: dict) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``((qt, qh, qw), (pt, ph, pw))`` of one denoiser call: its ``num_frames``, ``height`` and ``width`` arguments and
    the denoiser's ``patch_size_t`` and ``patch_size``.

    Raises:
        ProbeError: the call passes ``video_coords`` (its own position of every token), one timestep per token, or
            no positive int for one of the three arguments (passed by keyword, as LTX's pipelines pass them).
    """
    name = type(denoiser).__name__
    if kwargs.get("video_coords") is not None:
        raise ProbeError(
            f"{name} was called with video_coords (LTXConditionPipeline, LTXI2VLongMultiPromptPipeline: a position of "
            "its own for every token, conditioning frames among them) instead of num_frames, height and width: "
            "attnprobe reads LTX-Video's frame grid from those three arguments only (LTXPipeline)")
    given = {k: kwargs.get(k) for k in ("num_frames", "height", "width")}
    grid = tuple(_count(v) for v in given.values())
    if None in grid:
        raise ProbeError(
            f"{name} was called with num_frames={given['num_frames']!r}, height={given['height']!r}, "
            f"width={given['width']!r}: attnprobe reads LTX-Video's query grid from these arguments and needs a "
            "positive int for each, by keyword (LTXPipeline passes the latent frames, height and width)")
    timestep = kwargs.get("timestep")
    if isinstance(timestep, torch.Tensor) and timestep.ndim > 1 and timestep.shape[-1] > 1:
        raise ProbeError(
            f"{name} was called with a timestep per token ({tuple(timestep.shape)}: LTXImageToVideoPipeline's "
            "conditioning frame at timestep 0), while a store keeps one timestep per call: probe LTXPipeline")
    p, pt = int(denoiser.config.patch_size), int(denoiser.config.patch_size_t)
    return grid, (pt, p, p)


def _not_called(denoiser, sample):
    """``Family.video`` of a packed-latent family: the grid comes from the call's arguments (``packed_video``)."""
    raise ProbeError(f"{type(denoiser).__name__}'s frames come from the call's num_frames, height and width arguments, "
                     "not from its latents")


FAMILY = Family(
    name="ltx",
    title="LTX-Video text-to-video (LTXVideoTransformer3DModel)",
    denoisers=("LTXVideoTransformer3DModel",),
    kinds=("cross",),
    text_streams=first_text_encoder,
    reader="kernel",
    site_kind=_site_kind,
    video=_not_called,
    packed_video=_grid,
)
