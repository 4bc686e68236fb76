"""Flux.1 (``FluxTransformer2DModel``): double-stream joint-attention blocks and single-stream blocks over one
``[text; image]`` sequence, both with the rotary embedding the processor gets (``image_rotary_emb``) applied to q and
k. Text keys: the T5 encoder's positions (``text_encoder_2``; the CLIP ``text_encoder`` gives only the pooled vector).
Latents are packed 2×2 into tokens; their grid is read from ``img_ids``."""

import torch

from .registry import Family, first_text_encoder


def is_t5(encoder) -> bool:
    """Whether a text encoder is a T5 (or UMT5) model, by its config's ``model_type``."""
    return isinstance(encoder, torch.nn.Module) and getattr(getattr(encoder, "config", None), "model_type", "") in (
        "t5", "umt5")


def _t5_keys(pipe):
    if is_t5(getattr(pipe, "text_encoder_2", None)):
        return [("text_encoder_2", "tokenizer_2")]
    return first_text_encoder(pipe)


FAMILY = Family(
    name="flux",
    title="Flux.1 (FluxTransformer2DModel), Chroma (ChromaTransformer2DModel: Flux's attention, a T5 padding mask)",
    denoisers=("FluxTransformer2DModel", "ChromaTransformer2DModel"),
    kinds=("joint", "single"),
    text_streams=_t5_keys,
)
