"""CogView4 (``CogView4Transformer2DModel``): blocks whose attention runs over one ``[text; image]`` sequence, joined by
the processor from the image stream and ``encoder_hidden_states`` (no text projections of their own), with the rotary
embedding on the image positions only; read at the kernel.

Text keys: GLM-4's second-to-last hidden states of the prompt, left-padded to a multiple of 16 positions with the pad
token (not masked: padding keys get attention). Classifier-free guidance runs as separate calls, cond first; the
negative prompt has its own length.
"""

from .registry import Family, first_text_encoder

FAMILY = Family(
    name="cogview4",
    title="CogView4 (CogView4Transformer2DModel)",
    denoisers=("CogView4Transformer2DModel",),
    kinds=("single",),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=True,
)
