"""The tiny Mochi 1 pipeline: diffusers' ``MochiPipeline``, ``MochiTransformer3DModel`` and ``AutoencoderKLMochi`` at
widths of 16 to 32, seeded, with the offline ``t5_tokenizer``. ``attnprobe.models.tiny.tiny_pipeline("mochi")`` builds
it by name.

    >>> pipe = tiny_mochi_pipeline()
    >>> type(pipe).__name__, type(pipe.transformer).__name__, pipe.transformer.config.patch_size
    ('MochiPipeline', 'MochiTransformer3DModel', 2)

Call it with a small video: ``num_frames=13`` (3 latent frames: the pipeline's temporal factor is 6, its VAE's too),
``height=width=32`` (4 × 4 latents: the pipeline's spatial factor is 8; 2 × 2 patches of 2 × 2), 2 steps,
``max_sequence_length=16``.
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from .components import finish, make_t5_encoder
from .tokenizers import t5_tokenizer

__all__ = ["tiny_mochi_pipeline"]


@quiet_notes()
def tiny_mochi_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``MochiPipeline`` with Mochi 1's structure: 2 ``MochiTransformerBlock`` (2 heads of 8 channels; ``attn1``
    joint attention over ``[video; text]`` with the video's 3-D RoPE (its frequencies seeded, not diffusers' zeros) and
    QK RMS norms, each batch row's kernel call over its own unpadded text; the last block ``context_pre_only``), 2 × 2
    patches of each latent frame, a 2-layer T5 encoder of width 32 (``t5_tokenizer``), Mochi's causal video VAE
    (temporal compression 2 · 3 = 6, spatial 8, the 12 latent channels its pipeline assumes, 32 channels a block: its
    group norms take 32 groups) and a flow-matching Euler scheduler. Guided calls batch ``[uncond, cond]``.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=12, text_embed_dim=32, time_embed_dim=16, max_sequence_length=16,
    ).eval()
    with torch.no_grad():  # diffusers starts the RoPE frequencies at 0 (no rotation): the tiny ones turn
        transformer.pos_frequencies.normal_(0.0, 0.5)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32), latent_channels=12,
        layers_per_block=(1, 1, 1, 1, 1), temporal_expansions=(1, 2, 3), spatial_expansions=(2, 2, 2),
        add_attention_block=(False, False, False, False, False),
    ).eval()
    pipe = MochiPipeline(tokenizer=t5_tokenizer(), text_encoder=make_t5_encoder(seed + 2), vae=vae,
                         transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    return finish(pipe, dtype)
