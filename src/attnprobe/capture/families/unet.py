"""SD 1.x / 2.x, SDXL, Kolors and every other pipeline on diffusers' ``UNet2DConditionModel``: cross-attention ``attn2``
layers whose keys are the first text encoder's positions (SDXL concatenates its two CLIP encoders along features, so
its 77 positions are the first tokenizer's; Kolors' are ChatGLM's 256, padded on the left, through the UNet's text
projection); the mask is the pipeline's ``encoder_attention_mask``, if any."""

from .registry import Family, first_text_encoder, unet_order

FAMILY = Family(
    name="unet",
    title="SD 1.x/2.x, SDXL, Kolors and other UNet2DConditionModel pipelines",
    denoisers=("UNet2DConditionModel",),
    kinds=("cross",),
    text_streams=first_text_encoder,
    order=unet_order,
)
