"""The tiny Allegro pipeline: diffusers' ``AllegroPipeline``, ``AllegroTransformer3DModel`` and
``AutoencoderKLAllegro`` at widths of 8 to 24, seeded, with the offline ``t5_tokenizer``.
``attnprobe.models.tiny.tiny_pipeline("allegro")`` builds it by name.

    >>> pipe = tiny_allegro_pipeline()
    >>> type(pipe).__name__, type(pipe.transformer).__name__, pipe.transformer.config.patch_size
    ('AllegroPipeline', 'AllegroTransformer3DModel', 2)

Call it with a small video: ``num_frames=16`` (4 latent frames after the VAE's temporal compression of 4),
``height=width=32`` (4 × 4 latents, 2 × 2 patches), 2 steps, ``max_sequence_length=16``, ``clean_caption=False``
(cleaning needs ``bs4`` and ``ftfy``). Its VAE decodes only in tiles (``enable_tiling``, as Allegro's model card
does): the tiny one's tile is 8 frames × 32 × 32 pixels (2 × 4 × 4 latents) without overlap, so a video decodes
when its latent frames are a multiple of 2 and its sides multiples of 32. diffusers 0.42's tiled decoding takes one
video per pipeline call (several prompts fail in ``tiled_decode``): with several, ask for ``output_type="latent"``.
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from .components import finish, make_t5_encoder
from .tokenizers import t5_tokenizer

__all__ = ["tiny_allegro_pipeline"]

#: the tiny VAE's decoding tile: (frames, height, width) in pixels; tiles do not overlap
TILE = (8, 32, 32)


@quiet_notes()
def tiny_allegro_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An ``AllegroPipeline`` with Allegro's structure: 2 ``AllegroTransformerBlock`` (2 heads of 12 channels, the
    fewest its 3-D rotary table splits in three even parts; ``attn1`` video self-attention with that rotary
    embedding, ``attn2`` cross-attention to the projected T5 states with the padding mask as a −10000 bias), 2 × 2
    patches of each latent frame, a 2-layer T5 encoder of width 32 (``t5_tokenizer``), Allegro's video VAE
    (temporal compression 4, spatial 8, 4 latent channels; tiled decoding, ``TILE``) and its Euler-ancestral
    scheduler. Guided calls batch ``[uncond, cond]``.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import (AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro,
                           EulerAncestralDiscreteScheduler)

    torch.manual_seed(seed)
    transformer = AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=24, sample_height=4, sample_width=4, sample_frames=4, caption_channels=32,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLAllegro(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                               norm_num_groups=2, sample_size=TILE[1]).eval()
    vae.enable_tiling()
    vae.kernel, vae.stride = TILE, TILE  # diffusers' tile is 24 × 320 × 320 px, overlapping by 8 × 120 × 80
    pipe = AllegroPipeline(tokenizer=t5_tokenizer(), text_encoder=make_t5_encoder(seed + 2), vae=vae,
                           transformer=transformer, scheduler=EulerAncestralDiscreteScheduler())
    return finish(pipe, dtype)
