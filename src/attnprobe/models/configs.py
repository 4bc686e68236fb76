"""Real model configs (the values that differ from the diffusers classes' defaults, from the public ``config.json``
files of the checkpoints) and their denoisers built on the ``meta`` device: the true topology without weights or
memory, for checking site discovery, grids and sizes.

    >>> len(unet_on_meta(SD15_UNET).down_blocks)
    4
"""

from __future__ import annotations

import torch

__all__ = ["SD15_UNET", "SD21_UNET", "SDXL_UNET", "SD3_MEDIUM_TRANSFORMER", "SD35_MEDIUM_TRANSFORMER",
           "FLUX_DEV_TRANSFORMER", "unet_on_meta", "transformer_on_meta"]

# Real UNet configs (the values that differ from UNet2DConditionModel's defaults), from the public
# unet/config.json files of the checkpoints.
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    sample_size=64,
)
SD21_UNET = dict(
    SD15_UNET,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
    sample_size=96,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
)


def unet_on_meta(config: dict):
    """A ``UNet2DConditionModel`` with a real config on the ``meta`` device (no weights, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


# Real transformer configs (the values of the public transformer/config.json files), for the meta device
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD35_MEDIUM_TRANSFORMER = dict(
    SD3_MEDIUM_TRANSFORMER, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def transformer_on_meta(config: dict):
    """An ``SD3Transformer2DModel`` (or a ``FluxTransformer2DModel`` when ``config`` has ``num_single_layers``) with a
    real config on the ``meta`` device: the topology without weights or memory."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        return (FluxTransformer2DModel if "num_single_layers" in config else SD3Transformer2DModel)(**config)
