"""The tiny HunyuanVideo 1.5 text-to-video pipeline: diffusers' ``HunyuanVideo15Pipeline``,
``HunyuanVideo15Transformer3DModel`` and ``AutoencoderKLHunyuanVideo15`` at widths of 16 to 32, seeded, with the
offline ``llm_tokenizer`` (its ChatML template) and ``ByT5Tokenizer``. ``attnprobe.models.tiny.tiny_pipeline(
"hunyuanvideo-1.5")`` builds it by name.

    >>> pipe = tiny_hunyuanvideo15_pipeline()
    >>> type(pipe).__name__, type(pipe.transformer).__name__, pipe.tokenizer_max_length, pipe.tokenizer_2_max_length
    ('HunyuanVideo15Pipeline', 'HunyuanVideo15Transformer3DModel', 24, 16)

Call it with a small video: ``num_frames=9`` (3 latent frames: temporal factor 4), ``height=width=32`` (4 × 4 latents:
spatial factor 8), 2 steps. Its text keys are 24 Qwen2.5-VL positions after the chat template's head (the real
pipeline's 1000) and 16 ByT5 positions (the real 256); its denoiser adds ``vision_num_semantic_tokens`` image keys
(8 here, the real 729), masked out in text-to-video.
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from .components import finish, make_byt5_encoder
from .tiny_llm import qwen25vl_encoder
from .tokenizers import llm_tokenizer

__all__ = ["tiny_hunyuanvideo15_pipeline"]


@quiet_notes()
def tiny_hunyuanvideo15_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``HunyuanVideo15Pipeline`` with HunyuanVideo 1.5's structure: a 1-layer token refiner and 2 double-stream
    blocks (``transformer_blocks.i.attn``: 2 heads of 8 channels, one softmax over ``[video; reordered text]`` with a
    3-D RoPE on the video), patch 1, ``qwen25vl_encoder`` reading the prompt inside the pipeline's chat template (its
    system message, then the prompt; ``prompt_template_encode_start_idx`` counted with this tokenizer), a 1-layer ByT5
    encoder of width 32 for the prompt's quoted text, 8 image keys of width 16, HunyuanVideo 1.5's causal video VAE
    (temporal compression 4, spatial 8, 4 latent channels), a flow-matching Euler scheduler and the default
    classifier-free-guidance guider (separate calls, the prompt's first).

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                           HunyuanVideo15Transformer3DModel)
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer

    tokenizer, glyphs = llm_tokenizer(), ByT5Tokenizer()
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32,
        image_embed_dim=16, rope_axes_dim=(2, 2, 4), target_size=32, task_type="t2v",
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        spatial_compression_ratio=8, temporal_compression_ratio=4, scaling_factor=1.0,
    ).eval()
    torch.manual_seed(seed + 2)
    encoder = qwen25vl_encoder(tokenizer)
    byt5 = make_byt5_encoder(seed + 3, len(glyphs))
    pipe = HunyuanVideo15Pipeline(
        text_encoder=encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=byt5, tokenizer_2=glyphs,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    messages = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": "\x00"}]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).split("\x00")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(head).input_ids)
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 24, 16, 8
    return finish(pipe, dtype)
