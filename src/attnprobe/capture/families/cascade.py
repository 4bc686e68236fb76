"""Stable Cascade's prior (``StableCascadeUNet`` built with ``clip_text_in_channels``, run by
``StableCascadePriorPipeline``): a UNet of residual, timestep and attention blocks on one latent grid. Each attention
block (``SDCascadeAttnBlock``) maps the clip conditioning to its width and, with ``self_attn``, joins it after its own
image positions: its ``attention`` is a plain ``Attention`` (no ``cross_attention_dim``, so structure sees image
self-attention) whose image queries attend over ``[image (h·w); clip]`` keys in one softmax, where ``clip`` is
``[clip_text (CLIP's 77 positions); clip_text_pooled × clip_seq; clip_img × clip_seq]``. The family names these
modules joint sites (``site_kind``) read at the kernel, the text after the image (``text_first=False``); the pooled
text and the image embedding (zeros for text to image) are keys after the text (``keys_after``): they share the
softmax with the image keys and are not on the ``token`` axis.

Maps: ``[call, sample, head, qh, qw, token]`` per site, ``(qh, qw)`` the prior's latent grid (the latent side is the
pixel side over the pipeline's ``resolution_multiple``, 42.67; the released prior, ``switch_level=(False,)``, keeps
that resolution in every block, and a site at another scale gets its own grid, ``query_grid``), ``token`` CLIP's 77
positions. ``joint="exact"`` (default): each value is the key's share of the whole softmax
over ``h·w + 77 + clip_seq·(1 + images)`` keys, so a row sums to the text share, below 1; ``"renorm"``: the softmax
over the 77 text keys alone, rows summing to 1.

Text keys: ``clip_text``, the last hidden states of the CLIP text encoder with projection, every position (no mask).
The pipeline puts the prompts' rows before the negative prompts' (``passes.PROMPT_FIRST``). The denoiser's output is
an image embedding for the decoder, not an image. The decoder's ``StableCascadeUNet`` (no ``clip_text_in_channels``)
attends to the pooled text alone and is refused (``refused.CASCADE_DECODER``).
"""

from __future__ import annotations

import torch

from ...errors import ProbeError
from .registry import Family, first_text_encoder


def is_prior(denoiser) -> bool:
    """A ``StableCascadeUNet`` that takes per-token text (the prior), not the pooled text alone (the decoder)."""
    return getattr(denoiser.config, "clip_text_in_channels", None) is not None


def _site_kind(denoiser: torch.nn.Module, name: str, kind: str | None) -> str | None:
    from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock

    block_name, _, leaf = name.rpartition(".")
    block = denoiser.get_submodule(block_name) if block_name else None
    if leaf != "attention" or not isinstance(block, SDCascadeAttnBlock):
        return kind
    if not block.self_attn:  # keys [clip] alone: no image keys beside the text, a layout attnprobe does not read
        raise ProbeError(f"{name}: this StableCascadeUNet's attention blocks are built with self_attn=False (keys: "
                         "the clip conditioning alone); attnprobe reads Stable Cascade's [image; clip] attention only")
    return "joint"


def _keys_after(denoiser: torch.nn.Module, kwargs: dict) -> int:
    # get_clip_embeddings: [clip_text; clip_text_pooled × clip_seq; clip_img × clip_seq]
    pooled, text, image = (kwargs.get(n) for n in ("clip_text_pooled", "clip_text", "clip_img"))
    if not all(isinstance(t, torch.Tensor) for t in (pooled, text, image)):
        raise ProbeError(
            f"{type(denoiser).__name__} (Stable Cascade's prior) was called without clip_text_pooled, clip_text and "
            "clip_img as keywords: without clip_text and clip_img it attends to the pooled text alone, and attnprobe "
            "reads its conditioning by name, as StableCascadePriorPipeline passes it"
        )
    rows = lambda t: int(t.shape[1]) if t.dim() == 3 else 1  # noqa: E731  (a 2-D embedding is one row)
    return int(denoiser.config.clip_seq) * (rows(pooled) + rows(image))


FAMILY = Family(
    name="cascade",
    title="Stable Cascade's prior (StableCascadeUNet)",
    denoisers=("StableCascadeUNet",),
    kinds=("joint",),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=False,
    keys_after=_keys_after,
    site_kind=_site_kind,
    matches=is_prior,
    pipelines=("StableCascadePrior",),
)
