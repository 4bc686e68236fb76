"""The tiny LTX-Video pipeline: the real diffusers ``LTXPipeline``, ``LTXVideoTransformer3DModel`` and
``AutoencoderKLLTXVideo`` at widths of 8 to 32, seeded, with the offline ``t5_tokenizer``. ``attnprobe.models.tiny
.tiny_pipeline("ltx")`` builds it by name.

    >>> pipe = tiny_ltx_pipeline()
    >>> type(pipe).__name__, pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio
    ('LTXPipeline', 32, 8)

Call it with a small video: ``num_frames=17`` (3 latent frames after the VAE's temporal compression of 8), sides that
are multiples of 32 (``height=64, width=96``: a 2 × 3 latent), 2 steps, ``max_sequence_length=16``.
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from .components import finish, make_t5_encoder
from .tokenizers import t5_tokenizer

__all__ = ["tiny_ltx_pipeline"]


@quiet_notes()
def tiny_ltx_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An ``LTXPipeline`` with LTX-Video's structure: 2 ``LTXVideoTransformerBlock`` (2 heads of 12 channels, the
    fewest its 3-D rotary table fills; ``attn1`` video self-attention with the rotary embedding, ``attn2``
    cross-attention to the caption-projected T5 positions with RMS norms across heads and T5's padding mask as a
    ``−10000`` bias), 1 × 1 × 1 patches of packed latents, a 2-layer T5 encoder of width 32 (``t5_tokenizer``), LTX's
    video VAE (4 × 4 pixel patches, then three levels that halve time and space: temporal compression 8, spatial 32, 8
    latent channels) and a flow-matching Euler scheduler. Guided calls batch ``[uncond, cond]``.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline,
                           LTXVideoTransformer3DModel)

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
        cross_attention_dim=24, num_layers=2, caption_channels=32,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, patch_size=4, patch_size_t=1,
    ).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=make_t5_encoder(seed + 2),
                       tokenizer=t5_tokenizer(), transformer=transformer)
    return finish(pipe, dtype)
