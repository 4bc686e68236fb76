"""Fixtures for tests, docs and users: tiny pipelines built offline from configs with seeded weights, the real CLIP
tokenizer, real UNet and transformer configs for the ``meta`` device, the trained shapes model, and stores with known
answers. This module only re-exports them from ``attnprobe.models``; nothing in the library imports it.

    >>> pipe = tiny_sd_pipeline(seed=0)
    >>> type(pipe).__name__, pipe.unet.config.cross_attention_dim
    ('StableDiffusionPipeline', 32)

The tiny pipelines keep each family's real structure (SD 1.5: 16 cross-attention sites with the same names, 4
resolutions; SDXL: ``DownBlock2D`` first, two text encoders; SD3, Flux, PixArt-α: their blocks, text encoders and
masks) at widths of 8 to 32, so they run in milliseconds on a CPU. Their weights are random: maps and images show the
plumbing, not meaning. ``shapes_pipeline`` is the exception: the trained shapes model (docs/shapes-model.md).
"""

from .models.configs import (
    FLUX_DEV_TRANSFORMER,
    SD3_MEDIUM_TRANSFORMER,
    SD15_UNET,
    SD21_UNET,
    SD35_MEDIUM_TRANSFORMER,
    SDXL_UNET,
    transformer_on_meta,
    unet_on_meta,
)
from .models.synthetic import synthetic_store, synthetic_video_store
from .models.tiny import (
    TINY_PIPELINES,
    full_size_pipeline,
    shapes_pipeline,
    tiny_clip,
    tiny_flux_pipeline,
    tiny_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)
from .models.tokenizers import clip_tokenizer, llm_tokenizer, t5_tokenizer

__all__ = [
    "tiny_pipeline",
    "TINY_PIPELINES",
    "clip_tokenizer",
    "shapes_pipeline",
    "full_size_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_clip",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "tiny_pixart_pipeline",
    "t5_tokenizer",
    "SD3_MEDIUM_TRANSFORMER",
    "SD35_MEDIUM_TRANSFORMER",
    "FLUX_DEV_TRANSFORMER",
    "transformer_on_meta",
    "SD15_UNET",
    "SD21_UNET",
    "SDXL_UNET",
    "unet_on_meta",
    "synthetic_store",
    "synthetic_video_store",
]
