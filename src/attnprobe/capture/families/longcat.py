"""LongCat-Image (``LongCatImageTransformer2DModel``): Flux's structure (double-stream blocks over ``[text; image]``,
then single-stream blocks, RoPE on both: text at ``(0, i, i)``, the image at ``(1, 512 + row, 512 + column)``), no
attention mask, read at the kernel.

Text keys: Qwen2.5-VL's last hidden states of an encoding the pipeline assembles from pieces it tokenizes each alone:
its chat-template prefix (a system instruction, then the user turn), the prompt (quoted text, ``'…'`` or ``"…"``,
one character at a time, quotes included), its padding to ``tokenizer_max_length`` (512; masked in the encoder, not
in the denoiser: they take attention), then the template's suffix. The keys are the positions after the prefix and
before the suffix: the words, then ``pad``. Guidance runs as separate calls, conditional first (the negative prompt,
``""`` by default, is all padding). A call that rewrites the prompt with the text encoder (``enable_prompt_rewrite``,
on by default) is refused (``capture.passes.REWRITES``): its keys are the words of a generated text.
"""

from ...text.tokens import TokenLayout, token_strings
from .registry import Family, first_text_encoder


def _pieces(pipe, tokenizer, prompt: str, source: str) -> TokenLayout | None:
    """Every position the encoder reads for ``prompt``, tokenized piece by piece as ``_encode_prompt`` does."""
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import split_quotation  # the pipeline's own split

    parts = split_quotation(prompt)
    if "".join(part for part, _ in parts) != prompt:  # a split that does not give the prompt back: no offsets
        return None
    ids, offsets, at = [], [], 0
    for part, quoted in parts:  # quoted text one character at a time, the rest as it is
        for piece, start in ([(c, at + i) for i, c in enumerate(part)] if quoted else [(part, at)]):
            enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ids += enc["input_ids"]
            offsets += [(start + a, start + b) for a, b in enc["offset_mapping"]]
        at += len(part)
    size = int(pipe.tokenizer_max_length)
    truncated_at = offsets[size][0] if len(ids) > size else None
    ids, offsets = ids[:size], offsets[:size]
    pad = size - len(ids)
    prefix = tokenizer(pipe.prompt_template_encode_prefix, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(pipe.prompt_template_encode_suffix, add_special_tokens=False)["input_ids"]
    words = [(i, "word", o) for i, o in zip(ids, offsets)]
    pads = [(tokenizer.pad_token_id, "pad", None)] * pad
    body = pads + words if tokenizer.padding_side == "left" else words + pads
    rows = [(i, "template", None) for i in prefix] + body + [(i, "template", None) for i in suffix]
    all_ids = [i for i, _, _ in rows]
    return TokenLayout(strings=token_strings(tokenizer, all_ids), kinds=[k for _, k, _ in rows], ids=all_ids,
                       text=prompt, offsets=[o for _, _, o in rows], truncated_at=truncated_at, source=source)


def _positions(pipe, layout: TokenLayout, n_keys: int):
    begin = next((i for i, kind in enumerate(layout.kinds) if kind != "template"), len(layout.kinds))  # the pipeline drops the prefix
    # keys past the encoding (prompt_embeds of another length) are not named
    return [p if p < len(layout.kinds) else "unknown" for p in range(begin, begin + n_keys)]


FAMILY = Family(
    name="longcat",
    title="LongCat-Image (LongCatImageTransformer2DModel)",
    denoisers=("LongCatImageTransformer2DModel",),
    kinds=("joint", "single"),
    text_streams=first_text_encoder,
    single_needs_joint=True,
    reader="kernel",
    text_first=True,
    pieces=_pieces,
    text_positions=_positions,
)
