"""The token layout of one batch row: which word of which text stream sits at each of the denoiser's text keys
(``stream_layout``), from the prompt's text and the token ids each text encoder saw. ``rows.BatchRows`` calls it
for every sample it labels.
"""

from __future__ import annotations

from ..errors import ProbeError, warn
from ..text.tokens import TokenLayout, concat_layouts, decode_ids, token_layout, unlabelled_layout

__all__ = ["stream_layout", "layout_for"]


def layout_for(tok, text: str | None, ids: list[int] | None, n_keys: int, source: str) -> TokenLayout:
    """The layout of ``n_keys`` positions one tokenizer ``tok`` encoded: from ``text`` where its tokens are ``ids``
    (or where no ids were seen), else decoded from ``ids``, else unlabelled. A prompt longer than one encoding
    (embeddings built in chunks) is labelled ``"unknown"``, with a warning.

    Raises:
        ProbeError: ``source == "caller"`` (``probe(prompts=...)``) and the text is not what the encoder saw.
    """
    if tok is None or not getattr(tok, "is_fast", False):
        return unlabelled_layout(n_keys, source="none")
    if text is not None and ids is None and n_keys > int(getattr(tok, "model_max_length", n_keys)):
        # embeddings built in chunks of the tokenizer's length (compel, sd_embed, lpw: each chunk with its own
        # start and end tokens): which word sits at which position depends on the tool, so none is named
        warn(
            f"the conditioning has {n_keys} text positions, more than one encoding of {type(tok).__name__} "
            f"({tok.model_max_length}): a long prompt encoded in chunks. Its positions are labelled 'unknown' and "
            "concepts cannot be looked up in it; pass the token positions themselves (tokens=[...] positions)",
        )
        return TokenLayout(strings=[""] * n_keys, kinds=["unknown"] * n_keys, text=text, source="chunked")
    if text is not None:
        lay = token_layout(tok, text, n_keys, source=source)
        if ids is None or lay.ids == ids:
            return lay
        if text.lower().strip() != text:  # PixArt encodes the prompt lower-cased and stripped
            lowered = token_layout(tok, text.lower().strip(), n_keys, source=source)
            if lowered.ids == ids:
                return lowered
        if source == "caller":
            raise ProbeError(
                f"probe(prompts=...) says {text!r}, but the text encoder saw {decode_ids(tok, ids)!r}: "
                "give the texts of the prompts the pipeline encodes"
            )
    if ids is not None:
        lay = token_layout(tok, decode_ids(tok, ids), n_keys, source="decoded")
        if lay.ids == ids:
            return lay
        strings = [(s.removesuffix("</w>") or s) for s in tok.convert_ids_to_tokens(ids)]
        if len(strings) == n_keys:
            return TokenLayout(strings=strings, kinds=["unknown"] * n_keys, ids=ids, source="ids")
    return unlabelled_layout(n_keys, source="none")


def stream_layout(family, pipe, streams: list, tokenizer, text: str | None, ids_per_stream: list, prompt_index: int,
                  n_keys: int, source: str) -> TokenLayout:
    """One sample's token layout: each text stream's positions in key order (SD3: CLIP then T5).

    Args:
        family: the denoiser's ``Family``. pipe: the pipeline. streams: ``(attribute name, (encoder, tokenizer))``
            of each text stream, in key order. tokenizer: the first stream's (or the pipeline's) tokenizer.
        text: the sample's prompt, or ``None``. ids_per_stream: per stream, the ``[prompt, position]`` ids it encoded
            (``None`` where not seen). prompt_index: the sample's prompt. n_keys: the denoiser's text keys.
        source: ``TokenLayout.source`` (``"prompt"``, ``"caller"``).
    """
    first = ids_per_stream[0] if ids_per_stream else None
    if family.templated and len(streams) == 1:  # an LLM encoder reading a templated prompt
        ids = first[prompt_index].tolist() if first is not None else None
        lay = family.layout(pipe, streams[0][1][1], text, ids, n_keys, source)
        if lay is None and text is not None:
            warn(f"the {family.name} text encoder did not read the prompt {text!r} inside a template attnprobe "
                 "knows for it (a changed template or tokenizer, or prompt_embeds made with an unknown one): its "
                 "text positions are labelled 'unknown'")
            return TokenLayout(strings=[""] * n_keys, kinds=["unknown"] * n_keys, text=text, source="template")
        return lay or unlabelled_layout(n_keys, source="none")
    if len(streams) <= 1 and (first is None or first.shape[1] == n_keys):
        return layout_for(tokenizer, text, first[prompt_index].tolist() if first is not None else None, n_keys, source)
    # several streams, fewer encoded positions than keys (SD3 without T5: zeros after CLIP's 77), or more: a
    # stream's keys are its first positions (Kandinsky 3 cuts past the longest prompt), and its ids are checked so
    parts, left = [], n_keys
    for i, ((name, (encoder, tok)), ids) in enumerate(zip(streams, ids_per_stream)):
        last = i == len(streams) - 1
        size = int(ids.shape[1]) if ids is not None else left if last else int(tok.model_max_length)
        size = min(size, left)
        parts.append((name, layout_for(tok if tok is not None else tokenizer, text,
                                       ids[prompt_index, :size].tolist() if ids is not None else None, size, source)))
        left -= size
    return concat_layouts(parts, n_keys)
