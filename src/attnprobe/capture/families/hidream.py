"""HiDream-I1 (``HiDreamImageTransformer2DModel``): double-stream blocks (``double_stream_blocks.i.block.attn1``: image
and text streams with projections of their own, one softmax over ``[image; text]``) then single-stream blocks
(``single_stream_blocks.i.block.attn1``: one ``[image; text]`` sequence); read at the kernel. ``HiDreamAttention``
skips ``Attention``'s constructor and its blocks take the text as ``encoder_hidden_states`` either way, so structure
cannot tell the two apart: the family names them (``site_kind``).

Text keys, per block: T5's positions, then Llama's last listed layer, then the Llama layer the block is given
(``llama_layers[block]``): ``T5 + 2 × Llama`` positions, none masked (padding takes attention). The same Llama
positions appear twice on the ``token`` axis (two streams named after ``text_encoder_4``); a concept is found in
all three. CLIP gives only the pooled vector. A non-square latent is padded to ``max_resolution`` patches: the pad
keys are zero vectors that share each softmax, the pad queries are not image positions (``image_len``).
"""

from __future__ import annotations

import torch

from .registry import Family

_KINDS = {"double_stream_blocks": "joint", "single_stream_blocks": "single"}


def _streams(pipe):
    return [("text_encoder_3", "tokenizer_3"), ("text_encoder_4", "tokenizer_4"), ("text_encoder_4", "tokenizer_4")]


def _site_kind(denoiser: torch.nn.Module, name: str, kind: str | None) -> str | None:
    parts = name.split(".")
    return _KINDS.get(parts[0]) if len(parts) == 4 and parts[2:] == ["block", "attn1"] else None


def _image_len(denoiser: torch.nn.Module, hw) -> int:
    patch = int(denoiser.config.patch_size)
    return (hw[0] // patch) * (hw[1] // patch)


FAMILY = Family(
    name="hidream",
    title="HiDream-I1 (HiDreamImageTransformer2DModel)",
    denoisers=("HiDreamImageTransformer2DModel",),
    kinds=("joint", "single"),
    text_streams=_streams,
    reader="kernel",
    text_first=False,
    site_kind=_site_kind,
    image_len=_image_len,
)
