"""Flux.1 (``FluxTransformer2DModel``): double-stream joint-attention blocks and single-stream blocks over one
``[text; image]`` sequence, both with the rotary embedding the processor gets (``image_rotary_emb``) applied to q and
k. Text keys: the T5 encoder's positions (``text_encoder_2``; the CLIP ``text_encoder`` gives only the pooled vector).
Latents are packed 2×2 into tokens; their grid is read from ``img_ids``. FluxKontextPipeline appends its input image's
tokens to the generated image's (``denoiser_call.generated_tokens``): they share every softmax as keys, but only the
generated image's positions are queries of the maps (``image_len``)."""

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


def _generated(denoiser, hw) -> int:
    """The generated image's tokens: its latent grid ``hw`` (from its own ``img_ids``) in 2×2 patches."""
    return (hw[0] // 2) * (hw[1] // 2)


FAMILY = Family(
    name="flux",
    title="Flux.1 (FluxTransformer2DModel), Chroma (ChromaTransformer2DModel: Flux's attention, a T5 padding mask)",
    denoisers=("FluxTransformer2DModel", "ChromaTransformer2DModel"),
    kinds=("joint", "single"),
    text_streams=_t5_keys,
    image_len=_generated,
)
