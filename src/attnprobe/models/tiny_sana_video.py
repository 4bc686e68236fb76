"""The tiny Sana-Video pipeline: diffusers' ``SanaVideoPipeline`` and ``SanaVideoTransformer3DModel`` at a width of
16, with the tiny Sana's Gemma 2 encoder (``llm_tokenizer``, the prompt read after Sana's complex human instruction)
and Wan 2.1's video VAE, seeded. ``attnprobe.models.tiny.tiny_pipeline("sana-video")`` builds it by name.

    >>> pipe = tiny_sana_video_pipeline()
    >>> type(pipe).__name__, type(pipe.transformer).__name__, pipe.transformer.config.patch_size
    ('SanaVideoPipeline', 'SanaVideoTransformer3DModel', (1, 2, 2))

Call it with a small video: ``num_frames=9`` (3 latent frames), ``height=32, width=48``, 2 steps,
``max_sequence_length=16``.
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from .components import finish
from .tiny_llm import _gemma2
from .tokenizers import llm_tokenizer

__all__ = ["tiny_sana_video_pipeline"]


@quiet_notes()
def tiny_sana_video_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``SanaVideoPipeline`` with Sana-Video's structure: 2 blocks (2 heads of 8 channels; ``attn1`` linear video
    self-attention with a 3-D rotary embedding, ``attn2`` cross-attention to the Gemma 2 states with RMS norms across
    heads and the padding mask), ``(1, 2, 2)`` patches, a 1-layer Gemma 2 encoder of width 16, Wan 2.1's causal video
    VAE (temporal compression 4, spatial 8, 16 latent channels) and a flow-matching DPM-Solver scheduler. Guided calls
    batch ``[uncond, cond]``.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import (AutoencoderKLWan, DPMSolverMultistepScheduler, SanaVideoPipeline,
                           SanaVideoTransformer3DModel)

    tokenizer = llm_tokenizer(bos=True)
    torch.manual_seed(seed)
    transformer = SanaVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(seed + 2)
    encoder = _gemma2(tokenizer, layers=1)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    pipe = SanaVideoPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)
    return finish(pipe, dtype)
