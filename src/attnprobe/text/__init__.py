"""What the denoiser is told: a prompt's tokens, its text encoders' states, and how a variant changes them.

    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> base = encode_text(pipe, "a picture of dog")
    >>> other = encode_text(pipe, "Please forget anything about dog. Please help me generate a picture of dog.")
    >>> cmp = compare_text(base, other, "dog")
    >>> cmp.encoders[0].concept_cos.shape      # [occurrence, layer]: 2 mentions, embeddings + 2 layers
    torch.Size([2, 3])

- ``tokens``: a prompt's token layout (each key position's string, kind and character span, from the tokenizer's
  offsets) and ``find_concept``, a concept's positions per occurrence: the labels of a store's ``token`` axis.
- ``encode``: ``encode_text``, the conditioning exactly as the pipeline's ``encode_prompt`` builds it, with every
  layer's hidden states and self-attention.
- ``compare``: ``compare_text``, ``similarity_rows``, ``ablate_words``, ``instruction_attention``: cosines of the
  concept's representation between a variant and its baseline, per encoder and layer (the study's text side).
"""

from .compare import (
    EncoderComparison,
    TextComparison,
    ablate_words,
    compare_text,
    instruction_attention,
    instruction_positions,
    similarity_rows,
)
from .encode import EncoderStates, TextEncoding, encode_text, text_unsupported

__all__ = [
    "EncoderStates",
    "TextEncoding",
    "EncoderComparison",
    "TextComparison",
    "encode_text",
    "text_unsupported",
    "compare_text",
    "ablate_words",
    "instruction_attention",
    "instruction_positions",
]
