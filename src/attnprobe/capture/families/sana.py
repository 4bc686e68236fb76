"""Sana (``SanaTransformer2DModel``): a linear-attention DiT (its ``attn1`` is linear self-attention, not a site)
whose ``attn2`` cross-attends to Gemma 2's hidden states with their padding mask; read at the kernel.

Text keys: Gemma 2 read the prompt after Sana's "complex human instruction" (``__call__``'s
``complex_human_instruction``, joined by newlines; the negative prompt is read without it), padded to the
instruction's length + ``max_sequence_length`` − 2; the pipeline keeps the first position (``<bos>``) and the last
``max_sequence_length`` − 1. The keys are ``<bos>``, the instruction's last position (kind ``"template"``), the
user's words, then padding (masked out: probability 0).
"""

import inspect

from .registry import Family, first_text_encoder


def _template(pipe, prompt: str, n_keys: int):
    lines = inspect.signature(type(pipe).__call__).parameters.get("complex_human_instruction")
    lines = lines.default if lines is not None else None
    out = []
    if lines and isinstance(lines, (list, tuple)):
        instruction = "\n".join(lines)
        size = len(pipe.tokenizer.encode(instruction))
        out.append((instruction + prompt, len(instruction), size + n_keys - 2))
    return out + [(prompt, 0, n_keys)]


def _positions(pipe, layout, n_keys: int):
    length = len(layout.kinds)
    return [0] + list(range(length - n_keys + 1, length))


FAMILY = Family(
    name="sana",
    title="Sana (SanaTransformer2DModel)",
    denoisers=("SanaTransformer2DModel",),
    kinds=("cross",),
    text_streams=first_text_encoder,
    reader="kernel",
    template=_template,
    text_positions=_positions,
)
