"""Tiny pipelines of the families whose text encoder is a vision-language model read as a text encoder, beyond those
of ``tiny_llm`` (LongCat-Image: Qwen2.5-VL, which can also rewrite the prompt): the real diffusers pipeline and
denoiser classes and the real ``transformers`` encoder class at width 16, seeded, with the offline ``llm_tokenizer``.
``attnprobe.models.tiny.tiny_pipeline`` builds them by name.

    >>> pipe = tiny_longcat_pipeline()
    >>> type(pipe).__name__, type(pipe.text_encoder).__name__, pipe.tokenizer_max_length
    ('LongCatImagePipeline', 'Qwen2_5_VLForConditionalGeneration', 16)
"""

from __future__ import annotations

import torch

from .components import finish, make_flow_vae
from .tiny_llm import CONTENT_LIST_TEMPLATE, qwen25vl_encoder
from .tokenizers import llm_tokenizer

__all__ = ["tiny_longcat_pipeline"]


def tiny_longcat_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``LongCatImagePipeline`` with LongCat-Image's structure (Flux's: 1 double- and 2 single-stream blocks, 2 heads
    of 8 channels, RoPE over axes (2, 2, 4), latents of 16 channels packed 2×2), a 2-layer Qwen2.5-VL of width 16
    (``qwen25vl_encoder``) reading the pipeline's chat-template prefix, the prompt (quoted text one character at a
    time) padded to ``tokenizer_max_length`` and the template's suffix, a 4-level VAE with 16 latent channels and a
    flow-matching Euler scheduler. ``tokenizer_max_length`` is 16 (the real pipeline's 512): 16 text keys. The
    tokenizer (``llm_tokenizer`` with a template that takes content lists) stands in for the Qwen2-VL processor the
    pipeline's prompt rewriting calls (``enable_prompt_rewrite``; the processor itself needs torchvision).

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

    tokenizer, processor = llm_tokenizer(), llm_tokenizer()
    processor.chat_template = CONTENT_LIST_TEMPLATE
    torch.manual_seed(seed)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()
    torch.manual_seed(seed + 2)
    pipe = LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=make_flow_vae(seed + 1, 16),
                                text_encoder=qwen25vl_encoder(tokenizer), tokenizer=tokenizer, text_processor=processor,
                                transformer=transformer)
    pipe.tokenizer_max_length = 16
    return finish(pipe, dtype)
