"""Lumina-Next (``LuminaNextDiT2DModel``): blocks whose ``attn2`` cross-attends from the image positions (rotary
embedding on the queries, a norm on q and k, grouped-query heads) to the Gemma encoder's positions with its padding
mask, its output gated and added to the image self-attention's (``attn1``, not a site); read at the kernel.

Text keys: Gemma's second-to-last hidden states of the prompt, ``max_sequence_length`` positions (256), padding
masked (probability 0). The pipeline puts the prompts' rows before the negative prompts' (``passes.PROMPT_FIRST``).
"""

from .registry import Family, first_text_encoder

FAMILY = Family(
    name="lumina",
    title="Lumina-Next (LuminaNextDiT2DModel)",
    denoisers=("LuminaNextDiT2DModel",),
    kinds=("cross",),
    text_streams=first_text_encoder,
    reader="kernel",
)
