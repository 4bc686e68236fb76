"""Bria 3.x (``BriaTransformer2DModel``): Flux's structure (double-stream blocks whose one softmax runs over
``[text; image]``, then single-stream blocks over the joined sequence, RoPE on both), read at the kernel.

Text keys: T5's last hidden states of each prompt, encoded **one prompt at a time** without padding, then padded
with zeros to ``max_sequence_length`` (128): the prompt's positions (words, ``</s>``), then zero keys the pipeline
added (``unknown``; they take attention, nothing masks them). The default negative prompt is zero embeddings. The
pipeline encodes each prompt in a call of its own (``one_prompt``).
"""

from .registry import Family, first_text_encoder

FAMILY = Family(
    name="bria",
    title="Bria 3.x (BriaTransformer2DModel)",
    denoisers=("BriaTransformer2DModel",),
    kinds=("joint", "single"),
    text_streams=first_text_encoder,
    single_needs_joint=True,
    reader="kernel",
    text_first=True,
    one_prompt=True,
)
