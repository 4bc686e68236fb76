"""HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``): double-stream blocks (``transformer_blocks.i.attn``, text
projections of their own) then single-stream blocks (``single_transformer_blocks.i.attn``), one softmax over
``[image; text]`` with RoPE on the image positions only and the text padding masked out; read at the kernel.

Text keys: Qwen2.5-VL's hidden states (third from last) of the prompt inside the pipeline's chat template
(``pipe.prompt_template_encode``), its first ``prompt_template_encode_start_idx`` positions dropped
(``tokenizer_max_length`` positions, 1000), then ByT5's ``tokenizer_2_max_length`` (128) positions of the prompt's
quoted text (its glyphs; zeros, all masked, when it quotes nothing). The transformer reorders each row's keys to
``[attended ByT5; attended Qwen; masked ByT5; masked Qwen]``, so where the words sit depends on the row: the family
labels each row in that order. ByT5's tokenizer has no offsets (no fast version): its glyph positions are
``"unknown"``, and a concept is found in the Qwen positions only. Guidance runs as separate calls (the pipeline's
guider: conditional first).
"""

from __future__ import annotations

from .registry import Family, encode_template, first_text_encoder


def _glyph_text(prompt: str):
    from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

    return extract_glyph_text(prompt)


def _glyph_len(pipe, prompt: str, glyph_text) -> int:
    """The attended ByT5 positions of the prompt's quoted text (``glyph_text(prompt)``, ``None``: none), as the
    pipeline encodes it (0: no quoted text)."""
    glyph = glyph_text(prompt)
    if glyph is None:
        return 0
    size = pipe.tokenizer_2_max_length
    return len(pipe.tokenizer_2(glyph, max_length=size, truncation=True, add_special_tokens=True).input_ids)


def glyph_positions(pipe, layout, n_keys: int, glyph_text=_glyph_text):
    """A ``Family.text_positions`` for the denoisers that order each row's keys as ``[attended ByT5; attended Qwen;
    masked ByT5; masked Qwen]`` (HunyuanImage 2.1, HunyuanVideo 1.5): the Qwen positions past the template's head
    (``prompt_template_encode_start_idx``, ``tokenizer_max_length`` of them), the ByT5 ones ``"unknown"`` (attended)
    or ``None`` (masked). ``glyph_text``: ``prompt -> the text ByT5 encodes, or None``, as the pipeline extracts it."""
    # (n_keys without the ByT5 positions: encode_prompt's own conditioning, before the transformer joins them)
    drop = pipe.prompt_template_encode_start_idx
    kinds = layout.kinds[drop:drop + pipe.tokenizer_max_length]  # the pipeline keeps no more (words past it: cut)
    attended = [drop + i for i, kind in enumerate(kinds) if kind != "pad"]
    masked = [drop + i for i, kind in enumerate(kinds) if kind == "pad"]
    n_glyph = max(n_keys - len(kinds), 0)
    glyph = min(_glyph_len(pipe, layout.text or "", glyph_text), n_glyph)
    return (["unknown"] * glyph + attended + [None] * (n_glyph - glyph) + masked)[:n_keys]


FAMILY = Family(
    name="hunyuanimage",
    title="HunyuanImage 2.1 (HunyuanImageTransformer2DModel)",
    denoisers=("HunyuanImageTransformer2DModel",),
    kinds=("joint", "single"),
    text_streams=first_text_encoder,
    single_needs_joint=True,
    reader="kernel",
    text_first=False,
    template=encode_template,
    text_positions=glyph_positions,
)
