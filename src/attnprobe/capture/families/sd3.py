"""SD3 / SD3.5 (``SD3Transformer2DModel``): MM-DiT joint-attention blocks (image through ``to_q``/``to_k``, text through
``add_q_proj``/``add_k_proj``, after ``norm_q``/``norm_k``/``norm_added_k``; no rotary embedding). Text keys: the first
CLIP's 77 positions (CLIP-L and CLIP-G are concatenated along features, not positions), then T5's; without T5, CLIP's
alone. SD3.5's ``attn2`` is image self-attention, not a site."""

import torch

from .registry import Family, first_text_encoder


def _clip_then_t5(pipe):
    if isinstance(getattr(pipe, "text_encoder_3", None), torch.nn.Module):
        return [("text_encoder", "tokenizer"), ("text_encoder_3", "tokenizer_3")]
    return first_text_encoder(pipe)


FAMILY = Family(
    name="sd3",
    title="SD3, SD3.5 (SD3Transformer2DModel)",
    denoisers=("SD3Transformer2DModel",),
    kinds=("joint",),
    text_streams=_clip_then_t5,
)
