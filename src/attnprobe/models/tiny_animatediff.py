"""A tiny AnimateDiff text-to-video pipeline: diffusers' ``AnimateDiffPipeline`` on a ``UNetMotionModel`` built from
the tiny SD 1.5 UNet of ``tiny.tiny_sd_pipeline`` and a seeded ``MotionAdapter`` (one motion module per UNet block,
temporal self-attention only), with that pipeline's VAE, CLIP text encoder and tokenizer.
``attnprobe.models.tiny.tiny_pipeline("animatediff")`` builds it.

    >>> from attnprobe.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("animatediff")
    >>> type(pipe.unet).__name__
    'UNetMotionModel'
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from ..errors import ArgumentError
from .components import finish

__all__ = ["tiny_animatediff_pipeline"]


@quiet_notes()
def tiny_animatediff_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, sd_pipeline=None):
    """An ``AnimateDiffPipeline``: the tiny SD 1.5 UNet (``sd_pipeline``'s, weights seeded ``seed``) made a
    ``UNetMotionModel`` with a ``MotionAdapter`` seeded ``seed + 5`` (``block_out_channels`` and layers per block as the
    UNet's, 2 temporal heads), and the SD pipeline's VAE, text encoder, tokenizer and DDIM scheduler.

    Args:
        seed: weight seed. dtype: parameter dtype. sd_pipeline: ``(seed, dtype) -> StableDiffusionPipeline``, the
            tiny SD 1.5 builder (``tiny.tiny_sd_pipeline``, passed by ``tiny_pipeline``).
    """
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNetMotionModel
    from diffusers.utils import logging

    if sd_pipeline is None:  # tiny.py passes its SD 1.5 builder (it imports this module, so this one cannot)
        raise ArgumentError("tiny_animatediff_pipeline needs sd_pipeline, the tiny SD 1.5 builder: build it with "
                            "attnprobe.testing.tiny_pipeline('animatediff')")
    sd = sd_pipeline(seed=seed)
    channels = tuple(sd.unet.config.block_out_channels)
    torch.manual_seed(seed + 5)
    adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=sd.unet.config.layers_per_block, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=32)
    for p in adapter.parameters():  # diffusers zero-initialises the motion modules' output: seed them
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # from_unet2d casts to the UNet's dtype, with a warning about fp32 modules (none)
    try:
        unet = UNetMotionModel.from_unet2d(sd.unet, adapter).eval()
    finally:
        logging.set_verbosity(verbosity)
    pipe = AnimateDiffPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet,
                               motion_adapter=adapter, scheduler=sd.scheduler)
    return finish(pipe, dtype)
