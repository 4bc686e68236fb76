"""CogView3-Plus (``CogView3PlusTransformer2DModel``): blocks whose ``attn1`` runs over one ``[text; image]`` sequence,
joined by its processor (``CogVideoXAttnProcessor2_0``) from the image stream and ``encoder_hidden_states``, with
LayerNorm on q and k and no rotary embedding (positions are added to the patches); read at the kernel.

Text keys: T5's last hidden states of the prompt, ``max_sequence_length`` positions (224), padding not masked (it
takes attention). The batch is ``[uncond, cond]``; the default negative prompt is zero embeddings.
"""

from .registry import Family, first_text_encoder

FAMILY = Family(
    name="cogview3",
    title="CogView3-Plus (CogView3PlusTransformer2DModel)",
    denoisers=("CogView3PlusTransformer2DModel",),
    kinds=("single",),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=True,
)
