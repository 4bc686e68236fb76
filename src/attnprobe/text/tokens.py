"""Prompts → token strings, and concepts → token positions (per occurrence).

Positions are found with the tokenizer's character offsets, so multi-token words ("van gogh" → ``van``,
``gogh``), repeats ("… dog … dog") and case ("Dog") map to the positions the text encoder saw.

    >>> from attnprobe.testing import clip_tokenizer
    >>> layout = token_layout(clip_tokenizer(), "a picture of Van Gogh. Van Gogh!")
    >>> find_concept(layout, "van gogh")
    [[4, 5], [7, 8]]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ConceptError

__all__ = ["TokenLayout", "token_layout", "find_concept", "unlabelled_layout", "decode_ids", "concat_layouts",
           "template_layout", "select_positions", "token_strings"]


@dataclass
class TokenLayout:
    """What one sample's text keys are.

    Attributes:
        strings: one readable string per key position (``<|startoftext|>``, word pieces without ``</w>``,
            ``<|endoftext|>``; ``""`` where unknown). Length = the number of keys.
        kinds: per position ``"start"``, ``"word"``, ``"end"``, ``"pad"``, ``"template"`` (a position of the text
            the pipeline wrapped the prompt in before encoding: a system instruction, chat-turn tokens) or
            ``"unknown"``.
        ids: token ids, or ``None`` when the text encoder call was not seen (``prompt_embeds`` passed).
        text: the prompt text the positions come from, or ``None``.
        offsets: per position the ``[start, end)`` character span in ``text`` (``None`` for special tokens).
        truncated_at: character index in ``text`` where the tokenizer's maximum length cut it, or ``None``.
        source: how the text is known: ``"prompt"`` (the pipeline call's prompt), ``"decoded"`` (decoded from
            the ids), ``"caller"`` (given to ``probe(prompts=…)``), ``"zeros"`` (no text: zero embeddings),
            ``"chunked"`` (the caller's text, encoded in chunks: positions unknown), ``"template"`` (read inside a
            template attnprobe does not know: positions unknown), ``"contradicted"`` (a row whose
            conditioning contradicts its position in the batch: pass ``"unknown"``) or ``"none"``.
        streams: per position, the text encoder it comes from (``"text_encoder"``, ``"text_encoder_3"``…) when the
            keys concatenate several encoders' positions (SD3: 77 CLIP, then T5); empty for one encoder.
    """

    strings: list[str]
    kinds: list[str]
    ids: list[int] | None = None
    text: str | None = None
    offsets: list[tuple[int, int] | None] = field(default_factory=list)
    truncated_at: int | None = None
    source: str = "none"
    streams: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "strings": self.strings,
            "kinds": self.kinds,
            "ids": self.ids,
            "text": self.text,
            "offsets": [list(o) if o is not None else None for o in self.offsets],
            "truncated_at": self.truncated_at,
            "source": self.source,
            "streams": self.streams,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(
            strings=list(d["strings"]),
            kinds=list(d["kinds"]),
            ids=d.get("ids"),
            text=d.get("text"),
            offsets=[tuple(o) if o is not None else None for o in d.get("offsets", [])],
            truncated_at=d.get("truncated_at"),
            source=d.get("source", "none"),
            streams=list(d.get("streams", [])),
        )


def unlabelled_layout(n_keys: int, source: str = "none") -> TokenLayout:
    """A layout of ``n_keys`` positions without strings (``prompt_embeds`` passed, or zero embeddings)."""
    return TokenLayout(strings=[""] * n_keys, kinds=["unknown"] * n_keys, source=source)


def concat_layouts(parts: list[tuple[str, TokenLayout]], n_keys: int) -> TokenLayout:
    """One layout of several text encoders' positions in key order (SD3: CLIP's 77, then T5's), for the same text.

    ``find_concept`` then finds each occurrence in every stream: one occurrence lists its positions in all of them;
    a stream that encoded another text (``prompt_3``) keeps its labels but is not searched.
    The text counts as truncated only where every stream cut it (a word past CLIP's 77 tokens is still in T5's).
    Positions past the streams (an encoder that was not run, e.g. SD3 without T5: zeros) are ``"unknown"``.

    Args:
        parts: ``(stream name, layout)`` in key order. n_keys: total key positions.
    """
    strings, kinds, offsets, streams, ids = [], [], [], [], []
    base = next((lay.text for _, lay in parts if lay.text is not None), None)
    for name, lay in parts:
        strings += lay.strings
        kinds += lay.kinds
        # a stream that read another text (SD3's prompt_3) keeps its labels, but its offsets point into that text:
        # concepts are found only in the streams that read the first text
        same = lay.text == base
        offsets += (lay.offsets if same else None) or [None] * len(lay.strings)
        streams += [name] * len(lay.strings)
        ids = None if ids is None or lay.ids is None else ids + lay.ids
    extra = n_keys - len(strings)
    if extra > 0:
        strings, kinds, offsets, streams = strings + [""] * extra, kinds + ["unknown"] * extra, offsets + [None] * extra, streams + [""] * extra
        ids = None
    texts = [lay.text for _, lay in parts if lay.text is not None]
    cuts = [lay.truncated_at for _, lay in parts]
    return TokenLayout(
        strings=strings[:n_keys], kinds=kinds[:n_keys], ids=ids[:n_keys] if ids else None,
        text=texts[0] if texts else None, offsets=offsets[:n_keys],
        truncated_at=None if None in cuts or not cuts else max(cuts),
        source=parts[0][1].source if parts else "none", streams=streams[:n_keys],
    )


def _readable(tokenizer, token: str, special: set) -> str:
    """A token as text: byte-level characters decoded (``cafÃ©`` → ``café``), CLIP's ``</w>`` dropped; ``special``
    (the tokenizer's special tokens, as they are) read once by the caller: ``all_special_tokens`` builds a new list
    each time."""
    if token in special:
        return token
    try:
        text = tokenizer.convert_tokens_to_string([token])
    except Exception:  # a tokenizer without a byte-level decoder
        text = token
    text = text.replace("</w>", "").strip() if text.strip() != "</w>" else text
    return text or token


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """One readable string per id, as ``TokenLayout.strings`` shows them (byte-level pieces decoded, CLIP's ``</w>``
    dropped, special tokens as they are)."""
    special = set(tokenizer.all_special_tokens)
    return [_readable(tokenizer, t, special) for t in tokenizer.convert_ids_to_tokens(ids)]


def decode_ids(tokenizer, ids: list[int]) -> str:
    """The text a list of ids stands for (special tokens dropped; CLIP's word ends become spaces)."""
    special = set(tokenizer.all_special_ids)
    tokens = [t for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids)) if i not in special]
    return " ".join(tokenizer.convert_tokens_to_string(tokens).replace("</w>", " ").split())


def token_layout(tokenizer, text: str, n_keys: int | None = None, source: str = "prompt") -> TokenLayout:
    """Tokenize ``text`` as diffusers pipelines do (padding to the maximum length, truncation) with offsets.

    Args:
        tokenizer: a ``transformers`` fast tokenizer (``CLIPTokenizer`` in transformers ≥ 5 is one).
        text: the prompt.
        n_keys: number of key positions; default the tokenizer's ``model_max_length``.
        source: recorded in ``TokenLayout.source``.

    Returns:
        The layout: ``n_keys`` positions with strings, kinds, ids and character offsets.
    """
    n = int(n_keys or tokenizer.model_max_length)
    common = dict(add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False)
    full = tokenizer(text, truncation=False, **common)
    enc = tokenizer(text, padding="max_length", max_length=n, truncation=True, return_attention_mask=True, **common)
    ids = list(enc["input_ids"])
    # padding is what the attention mask leaves out (a literal "!" stays a word where "!" also pads);
    # special tokens the tokenizer added are the start and end
    kinds, offsets, seen_word = [], [], False
    for tid, off, special, attended in zip(ids, enc["offset_mapping"], enc["special_tokens_mask"], enc["attention_mask"]):
        if not attended:
            kinds.append("pad")
        elif special:
            kinds.append("end" if seen_word or tid == tokenizer.eos_token_id else "start")
        else:
            kinds.append("word")
            seen_word = True
        offsets.append(tuple(off) if kinds[-1] == "word" else None)
    starts = [i for i, k in enumerate(kinds) if k == "start"]
    if "end" not in kinds and len(starts) > 1:  # an empty prompt: start, then end (not a lone start after left padding)
        kinds[starts[1]] = "end"
    truncated_at = None
    kept_words = kinds.count("word")
    full_words = [tuple(o) for o, sp in zip(full["offset_mapping"], full["special_tokens_mask"]) if not sp]
    if len(full_words) > kept_words:
        truncated_at = full_words[kept_words][0]
    return TokenLayout(
        strings=token_strings(tokenizer, ids),
        kinds=kinds,
        ids=ids,
        text=text,
        offsets=offsets,
        truncated_at=truncated_at,
        source=source,
    )


def template_layout(tokenizer, templated: str, start: int, text: str, n: int | None = None,
                    source: str = "prompt") -> TokenLayout:
    """The layout of a prompt that the pipeline wrapped in a template before encoding (Qwen-Image's system
    instruction and chat turns, Sana's complex human instruction): ``templated`` tokenized as ``token_layout`` does,
    its positions inside the prompt (characters ``start … start + len(text)``) kept as ``"word"`` with offsets into
    ``text``, every other position ``"template"`` but the padding and a start token the tokenizer adds first
    (Gemma's ``<bos>``: ``"start"``); no offsets outside the prompt: concepts are never found in the template.

    Args:
        tokenizer: a fast tokenizer. templated: the text the encoder read. start: where ``text`` begins in it.
        text: the user's prompt. n: positions (padding to it); default ``templated``'s own length (no padding).
        source: recorded in ``TokenLayout.source``.
    """
    if n is None:
        n = len(tokenizer(templated, add_special_tokens=True, verbose=False)["input_ids"])
    lay = token_layout(tokenizer, templated, n, source=source)
    end = start + len(text)
    kinds, offsets = [], []
    for i, (kind, off) in enumerate(zip(lay.kinds, lay.offsets)):
        inside = off is not None and off[0] < end and off[1] > start  # a piece across the border counts as the word's
        bos = i == 0 and kind == "start" and lay.ids[0] == getattr(tokenizer, "bos_token_id", None)
        kinds.append("word" if inside else "start" if bos else "pad" if kind == "pad" else "template")
        offsets.append((max(off[0], start) - start, min(off[1], end) - start) if inside else None)
    cut = lay.truncated_at
    return TokenLayout(strings=lay.strings, kinds=kinds, ids=lay.ids, text=text, offsets=offsets,
                       truncated_at=max(0, cut - start) if cut is not None and cut < end else None, source=source)


def select_positions(layout: TokenLayout, positions: list[int | str | None]) -> TokenLayout:
    """The layout of the keys a pipeline made from an encoding's positions: key ``i`` is encoded position
    ``positions[i]``; ``None`` marks a key the pipeline added (zero padding: kind ``"pad"``, id -1), ``"unknown"`` a
    key of another encoder whose positions are not labelled (HunyuanImage's ByT5 glyph bytes: kind ``"unknown"``)."""
    pick = lambda values, empty: [values[p] if isinstance(p, int) else empty for p in positions]  # noqa: E731
    return TokenLayout(
        strings=pick(layout.strings, ""), kinds=[layout.kinds[p] if isinstance(p, int) else p or "pad" for p in positions],
        ids=pick(layout.ids, -1) if layout.ids is not None else None, text=layout.text,
        offsets=pick(layout.offsets or [None] * len(layout.strings), None), truncated_at=layout.truncated_at,
        source=layout.source, streams=pick(layout.streams, "") if layout.streams else [],
    )


def concept_pattern(concept: str) -> re.Pattern:
    """The regular expression ``find_concept`` matches a concept with: its words, case-insensitive, whole words, any
    whitespace between them.

    Raises:
        ConceptError: the concept is not a string, or is empty.
    """
    if not isinstance(concept, str):
        raise ConceptError(f"a concept is a word or phrase (str); got {concept!r} ({type(concept).__name__})")
    words = concept.strip().split()
    if not words:
        raise ConceptError(f"the concept {concept!r} is empty: pass a word or phrase of the prompt")
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def find_concept(layout: TokenLayout, concept: str, where: str = "the prompt") -> list[list[int]]:
    """Token positions of every occurrence of ``concept`` in a layout's text.

    Matching is case-insensitive, on whole words (``"dog"`` does not match ``"dogs"``), with any whitespace
    between a phrase's words. Each occurrence maps to the positions whose character span overlaps it.

    Args:
        layout: from ``token_layout`` (or a store's sample).
        concept: a word or phrase, e.g. ``"van gogh"``.
        where: how to name the sample in errors.

    Returns:
        One list of key positions per occurrence, in text order.

    Raises:
        ConceptError: the layout has no text, or no known positions (a prompt encoded in chunks); the concept is
            not in it (the message shows the tokens); or an occurrence lies past the tokenizer's maximum length
            (truncated).
    """
    if layout.source == "contradicted":
        raise ConceptError(
            f"{where} is a batch row whose conditioning contradicts the pass its position names ("
            "see store.meta['row_evidence'] and the warning at capture): attnprobe does not know what it was "
            "conditioned on, so it has no text to find a concept in. Use a labelled sample, or select positions by index"
        )
    if layout.text is None:
        raise ConceptError(
            f"{where} has no prompt text (source: {layout.source}): the pipeline was called with prompt_embeds "
            "or zero embeddings. Pass the texts with probe(..., prompts=[...]) to label its positions."
        )
    if layout.kinds and all(k == "unknown" for k in layout.kinds):
        why = ("the text encoder read it inside a template attnprobe does not know" if layout.source == "template" else
               f"a long prompt encoded in chunks has {len(layout.kinds)} positions whose words attnprobe cannot place")
        raise ConceptError(
            f"the token positions of {where} are unknown (source: {layout.source}; {why}), so {concept!r} cannot be "
            "looked up: select token positions by index"
        )
    pattern = concept_pattern(concept)
    found = []
    for match in pattern.finditer(layout.text):
        start, end = match.span()
        if layout.truncated_at is not None and end > layout.truncated_at:
            streams = list(dict.fromkeys(s for s in layout.streams if s))
            over = f" over {' + '.join(streams)}" if len(streams) > 1 else ""
            raise ConceptError(
                f"concept {concept!r} (occurrence {len(found) + 1}, characters {start}-{end}) in {where} lies past "
                f"the maximum length ({len(layout.strings)} token positions{over}): the text encoder never saw it. "
                f"The kept text ends at character {layout.truncated_at}: {layout.text[: layout.truncated_at]!r}"
            )
        positions = [
            p for p, off in enumerate(layout.offsets) if off is not None and off[0] < end and off[1] > start
        ]
        if positions:
            found.append(positions)
    if not found:
        words = [s for s, k in zip(layout.strings, layout.kinds) if k == "word"]
        raise ConceptError(
            f"concept {concept!r} is not in {where}: {layout.text!r}. Its word tokens are {words}. "
            "Concepts match whole words, case-insensitively."
        )
    return found
