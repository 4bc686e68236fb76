"""PixArt-α / PixArt-Σ (``PixArtTransformer2DModel``): a DiT whose ``attn2`` cross-attends to T5 keys with T5's padding
mask (padded keys get probability 0); the keys are the T5 encoder's positions."""

from .registry import Family, first_text_encoder

FAMILY = Family(
    name="pixart",
    title="PixArt-α, PixArt-Σ (PixArtTransformer2DModel)",
    denoisers=("PixArtTransformer2DModel",),
    kinds=("cross",),
    text_streams=first_text_encoder,
)
