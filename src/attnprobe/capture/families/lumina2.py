"""Lumina-Image 2.0 (``Lumina2Transformer2DModel``): a context refiner (text only) and a noise refiner (image only),
then ``layers`` of self-attention over each row's ``[attended caption positions; image positions; padding]``: where
the image starts differs by row (``Family.row_text``); read at the kernel. The layers get the joined sequence as
their ``hidden_states``, so the family names them (``single_blocks``).

Text keys: Gemma 2's second-to-last hidden states of the prompt after the pipeline's system prompt (``system_prompt +
" <Prompt Start> " + prompt``; the negative prompt is read without it), padded to ``max_sequence_length`` (256):
on the ``token`` axis, a row's positions past its attended ones get probability 0 (they are not in its sequence).
Classifier-free guidance runs as separate calls.
"""

import inspect

from .registry import Family, first_text_encoder


def _template(pipe, prompt: str, n_keys: int):
    system = getattr(pipe, "system_prompt", None)
    given = inspect.signature(type(pipe).__call__).parameters.get("system_prompt")
    out = []
    if isinstance(system, str) and (given is None or given.default is None):
        head = system + " <Prompt Start> "
        out.append((head + prompt, len(head), n_keys))
    return out + [(prompt, 0, n_keys)]


FAMILY = Family(
    name="lumina2",
    title="Lumina-Image 2.0 (Lumina2Transformer2DModel)",
    denoisers=("Lumina2Transformer2DModel",),
    kinds=("single",),
    text_streams=first_text_encoder,
    reader="kernel",
    template=_template,
    single_blocks="layers",
    row_text=True,
)
