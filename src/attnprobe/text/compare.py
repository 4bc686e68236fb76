"""Compare what the denoiser is told: does an instruction change a concept's text-encoder representation?
(An example: ``attnprobe.text``.)

``encode_text`` runs the pipeline's own tokenizer(s) and text encoder(s) and builds the conditioning exactly as
the pipeline's ``encode_prompt`` does (SD 1.x/2.x: the last hidden state, or ``clip_skip`` layers earlier
through the final layer norm; SDXL: both encoders' penultimate hidden states concatenated, plus the pooled
projection of the second; T5: the last hidden state). It also keeps every layer's hidden states and every
layer's self-attention probabilities.

Measures (all cosine similarities, computed in float64; 1 means unchanged direction):

- **concept similarity**: cosine between the concept's token vector in the variant and in the baseline, per
  layer. A multi-token concept's vector is the mean of its tokens' hidden states (token-level concept vectors,
  as in Ring-A-Bell, Tsai et al. 2024). Mentions are aligned by occurrence from the end: every mention of the
  variant is compared with the baseline mention at the same distance from the last (the baseline's only
  mention when it has one); each mention and their mean are reported.
- **EOS similarity**: cosine of the hidden state at the end token (``pooled`` for CLIP), per layer.
- **sequence similarity**: the whole sequence of real tokens (start, words, end; padding excluded), either
  flattened over ``[token, hidden]`` (positions compared one to one; sensitive to shifts) or mean-pooled over
  tokens first (insensitive to shifts).
- **Δ similarity vs the repetition control** (the seed study's Δ similarity, arXiv 2604.01514):
  ``sim(variant, baseline) − sim(repetition, baseline)``: below 0, the instruction moves the concept more than
  merely mentioning it twice does.

CLIP text encoders are causal: a token attends only to itself and earlier tokens. So a concept mention can
read the instruction words before it, and instruction words can read only mentions before them;
``instruction_attention`` reports both directions and which pairs the mask allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import ArgumentError, ConceptError
from .encode import TextEncoding, encode_text
from .tokens import TokenLayout, concept_pattern, find_concept

__all__ = ["EncoderComparison", "TextComparison", "compare_text", "ablate_words", "instruction_attention",
           "instruction_positions", "similarity_rows"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _real(layout: TokenLayout) -> list[int]:
    return [i for i, k in enumerate(layout.kinds) if k in ("start", "word", "end")]


def _end(layout: TokenLayout) -> int:
    # the end token; without one (an LLM encoder), the last position that is not padding
    if "end" in layout.kinds:
        return layout.kinds.index("end")
    return max((i for i, k in enumerate(layout.kinds) if k != "pad"), default=len(layout.kinds) - 1)


def _aligned(n_base: int, n_other: int) -> list[int]:
    """For each of the variant's mentions, the baseline mention it is compared with (aligned from the end)."""
    return [max(0, n_base - n_other + j) for j in range(n_other)]


def _occurrences(layout: TokenLayout, concept: str, where: str, other: TokenLayout | None = None) -> list[list[int]]:
    try:
        return find_concept(layout, concept, where=where)
    except ConceptError as exc:
        if other is None:
            raise
        words = [s for s, k in zip(other.strings, other.kinds) if k == "word"]
        raise ConceptError(f"{exc} The other prompt {other.text!r} has tokens {words}.") from None


@dataclass
class EncoderComparison:
    """Per-layer similarities of one encoder between a variant and its baseline (all float64).

    Attributes:
        name: the encoder. concept_cos: ``[occurrence, layer]`` (variant mentions, aligned from the end).
        eos_cos: ``[layer]`` at the end token. seq_flat_cos, seq_mean_cos: ``[layer]``, see the module doc.
        pooled_cos: cosine of the pooled outputs (a float, NaN when there is none).
    """

    name: str
    concept_cos: torch.Tensor
    eos_cos: torch.Tensor
    seq_flat_cos: torch.Tensor
    seq_mean_cos: torch.Tensor
    pooled_cos: float


@dataclass
class TextComparison:
    """``compare_text``'s result: per encoder per layer, and for the conditioning the denoiser gets.

    Attributes:
        encoders: one ``EncoderComparison`` per text encoder.
        concept_cos: ``[occurrence]`` concept similarity in the conditioning. concept_cos_mean: their mean.
        seq_flat_cos, seq_mean_cos: conditioning sequence similarity. pooled_cos: SDXL's pooled projection
            (NaN otherwise). pairs: (baseline mention, variant mention) compared.
    """

    encoders: list[EncoderComparison]
    concept_cos: torch.Tensor
    concept_cos_mean: float
    seq_flat_cos: float
    seq_mean_cos: float
    pooled_cos: float
    pairs: list[tuple[int, int]] = field(default_factory=list)


def _concept_vec(x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    return x[..., positions, :].mean(dim=-2)  # [..., token, hidden] → [..., hidden]


def _seq_cos(a: torch.Tensor, b: torch.Tensor, real_a: list[int], real_b: list[int]):
    n = min(len(real_a), len(real_b))
    flat = _cos(a[..., real_a[:n], :].flatten(-2), b[..., real_b[:n], :].flatten(-2))
    mean = _cos(a[..., real_a, :].mean(-2), b[..., real_b, :].mean(-2))
    return flat, mean


def compare_text(base: TextEncoding, other: TextEncoding, concept: str) -> TextComparison:
    """Similarity of a variant's encoding to its baseline's, per encoder and layer and for the conditioning.

    Args:
        base: the baseline's ``encode_text``.
        other: the variant's, from the same pipeline.
        concept: word or phrase in both prompts.

    Returns:
        A ``TextComparison`` (see the module doc for every measure; shapes ``[occurrence, layer]``, ``[layer]``).

    Raises:
        ConceptError: the concept is missing from either prompt (the message shows both token lists).
    """
    per_encoder = []
    pairs = []
    for eb, eo in zip(base.encoders, other.encoders):
        occ_b = _occurrences(eb.layout, concept, f"the baseline {base.prompt!r}", eo.layout)
        occ_o = _occurrences(eo.layout, concept, f"the variant {other.prompt!r}", eb.layout)
        pairs = list(zip(_aligned(len(occ_b), len(occ_o)), range(len(occ_o))))
        concept_cos = torch.stack([
            _cos(_concept_vec(eo.hidden_states, occ_o[j]), _concept_vec(eb.hidden_states, occ_b[i])) for i, j in pairs
        ])
        eos = _cos(eo.hidden_states[:, _end(eo.layout)], eb.hidden_states[:, _end(eb.layout)])
        flat, mean = _seq_cos(eo.hidden_states, eb.hidden_states, _real(eo.layout), _real(eb.layout))
        pooled = float(_cos(eo.pooled, eb.pooled)) if eo.pooled is not None and eb.pooled is not None else float("nan")
        per_encoder.append(EncoderComparison(eo.name, concept_cos, eos, flat, mean, pooled))
    occ_b = _occurrences(base.layout, concept, f"the baseline {base.prompt!r}")
    occ_o = _occurrences(other.layout, concept, f"the variant {other.prompt!r}")
    cond = torch.stack([
        _cos(_concept_vec(other.conditioning, occ_o[j]), _concept_vec(base.conditioning, occ_b[i])) for i, j in pairs
    ])
    flat, mean = _seq_cos(other.conditioning, base.conditioning, _real(other.layout), _real(base.layout))
    pooled = float(_cos(other.pooled, base.pooled)) if other.pooled is not None and base.pooled is not None else float("nan")
    return TextComparison(per_encoder, cond, float(cond.mean()), float(flat), float(mean), pooled, pairs)


_WORD = re.compile(r"\w+|[^\w\s]")


def ablate_words(pipe, prompt: str, concept: str, *, mode: str = "mask", clip_skip: int | None = None) -> list[dict]:
    """How much each word of the prompt moves the concept and the conditioning (one row per word).

    Each word (``\\w+`` or one punctuation mark) is ablated on its own: ``mode="mask"`` replaces its tokens by
    the padding token (positions keep their place), ``mode="remove"`` deletes it from the text and re-encodes.
    A last row ablates the concept's own tokens (masked with the padding embedding) as the reference of what
    "the concept removed" looks like.

    Returns:
        Rows ``{"word", "start", "is_concept", "mode", "concept_change", "conditioning_change"}``:
        ``concept_change`` = 1 − cosine of the concept's last mention in the conditioning (ablated vs intact;
        NaN when the ablation removes that mention), ``conditioning_change`` = 1 − cosine of the mean-pooled
        conditioning over real tokens. 0 means no change.

    Raises:
        ConceptError: the concept is not in the prompt. ArgumentError (a ValueError): an unknown mode.
    """
    if mode not in ("mask", "remove"):
        raise ArgumentError(f"mode={mode!r} is not 'mask' or 'remove'")
    intact = encode_text(pipe, prompt, attentions=False, clip_skip=clip_skip)
    occ = _occurrences(intact.layout, concept, f"the prompt {prompt!r}")
    ref_vec = _concept_vec(intact.conditioning, occ[-1])
    ref_mean = intact.conditioning[_real(intact.layout)].mean(0)
    concept_spans = [m.span() for m in concept_pattern(concept).finditer(prompt)]

    def changes(enc: TextEncoding, positions: list[int] | None) -> tuple[float, float]:
        cc = float("nan") if positions is None else 1 - float(_cos(_concept_vec(enc.conditioning, positions), ref_vec))
        return cc, 1 - float(_cos(enc.conditioning[_real(enc.layout)].mean(0), ref_mean))

    rows = []
    last_span = [m.span() for m in concept_pattern(concept).finditer(prompt)][-1]
    for match in _WORD.finditer(prompt):
        s, e = match.span()
        in_concept = any(cs <= s and e <= ce for cs, ce in concept_spans)
        hits_last = last_span[0] <= s and e <= last_span[1]
        if mode == "mask":
            pos = [p for p, off in enumerate(intact.layout.offsets) if off and off[0] < e and off[1] > s]
            if not pos:  # past the tokenizer's maximum length: nothing to mask
                rows.append(dict(word=match.group(), start=s, is_concept=in_concept, mode=mode,
                                 concept_change=float("nan"), conditioning_change=float("nan")))
                continue
            enc = encode_text(pipe, prompt, attentions=False, clip_skip=clip_skip, mask_positions=pos)
            last = None if hits_last else occ[-1]
        else:
            text = " ".join((prompt[:s] + prompt[e:]).split())
            enc = encode_text(pipe, text, attentions=False, clip_skip=clip_skip)
            try:
                last = None if hits_last else find_concept(enc.layout, concept)[-1]
            except ConceptError:
                last = None
        cc, sc = changes(enc, last)
        rows.append(dict(word=match.group(), start=s, is_concept=in_concept, mode=mode, concept_change=cc,
                         conditioning_change=sc))
    all_concept = sorted({p for o in occ for p in o})
    enc = encode_text(pipe, prompt, attentions=False, clip_skip=clip_skip, mask_positions=all_concept)
    cc, sc = changes(enc, occ[-1])
    rows.append(dict(word=f"<{concept} → padding>", start=-1, is_concept=True, mode="mask", concept_change=cc,
                     conditioning_change=sc))
    return rows


def instruction_positions(variant: TokenLayout, baseline: TokenLayout) -> list[int]:
    """Word positions of the variant whose word is not in the baseline prompt (case-insensitive): the
    instruction's tokens, e.g. ``please``, ``forget``, ``anything``, ``about``… against ``a picture of dog``."""
    base_words = {s.lower() for s, k in zip(baseline.strings, baseline.kinds) if k == "word"}
    return [i for i, (s, k) in enumerate(zip(variant.strings, variant.kinds)) if k == "word" and s.lower() not in base_words]


def instruction_attention(encoding: TextEncoding, concept: str, instruction: list[int], encoder: int = 0) -> dict:
    """Self-attention between the concept's mentions and the instruction's tokens inside a text encoder.

    Args:
        encoding: from ``encode_text(..., attentions=True)``. concept: word or phrase of its prompt.
        instruction: token positions of the instruction (see ``instruction_positions``).
        encoder: which text encoder. Default: the first.

    Returns:
        ``{"concept_to_instruction": [occurrence, layer, head], "instruction_to_concept": [occurrence, layer,
        head], "allowed_concept_to_instruction": [occurrence], "allowed_instruction_to_concept": [occurrence]}``:
        attention mass (sum of probabilities) from each mention's tokens (averaged) to the instruction tokens, and
        from the instruction tokens (averaged) to each mention; the ``allowed_*`` counts say how many
        (query, key) pairs the causal mask lets through (CLIP: a token sees only itself and earlier tokens).

    Raises:
        ConceptError: the concept is not in the prompt. ArgumentError (a ValueError): attentions were not computed.
    """
    states = encoding.encoders[encoder]
    if states.attentions is None:
        raise ArgumentError("encode_text(..., attentions=True) is needed for instruction_attention")
    occ = find_concept(states.layout, concept)
    att = states.attentions.double()  # [layer, head, query, key]
    inst = list(instruction)
    c2i, i2c, allowed_c2i, allowed_i2c = [], [], [], []
    for positions in occ:
        c2i.append(att[:, :, positions][..., inst].sum(-1).mean(-1) if inst else torch.zeros(att.shape[:2]))
        i2c.append(att[:, :, inst][..., positions].sum(-1).mean(-1) if inst else torch.zeros(att.shape[:2]))
        allowed_c2i.append(sum(1 for q in positions for k in inst if k <= q))
        allowed_i2c.append(sum(1 for q in inst for k in positions if k <= q))
    return {
        "concept_to_instruction": torch.stack(c2i),
        "instruction_to_concept": torch.stack(i2c),
        "allowed_concept_to_instruction": allowed_c2i,
        "allowed_instruction_to_concept": allowed_i2c,
    }


def similarity_rows(pipe, concept: str, prompts: dict[str, str], baseline: str = "baseline",
                    control: str = "repetition", encode=None) -> list[dict]:
    """Tidy rows of ``compare_text`` for every variant against the baseline, per encoder and layer.

    Args:
        pipe: the pipeline. concept: the concept. prompts: ``{variant: prompt}``, including ``baseline``.
        baseline: the baseline's variant name.
        control: the repetition control's variant name.
        encode: ``(pipe, prompt) -> TextEncoding``. Default: ``encode_text`` (CLIP and T5 encoders of UNet
            pipelines); ``attnprobe.capture.encoders.pipeline_encoding`` reads any family's encoders through the
            pipeline's ``encode_prompt``.

    Returns:
        Rows ``{concept, variant, encoder, layer, concept_cos, concept_cos_last, eos_cos, seq_flat_cos,
        seq_mean_cos, delta_vs_repetition, delta_last_vs_repetition}``; ``encoder="conditioning"`` (``layer=-1``)
        is what the denoiser gets, and its ``eos_cos`` is the pooled projection's cosine (SDXL; NaN without one).
        ``delta_vs_repetition`` = ``concept_cos`` (mean over mentions) − the control's;
        ``delta_last_vs_repetition`` = the same for the last mention (NaN without a control, and for the baseline).

    Raises:
        ConceptError: the concept is missing from a prompt. KeyError: no baseline prompt.
    """
    encoded = {name: (encode(pipe, text) if encode is not None else encode_text(pipe, text, attentions=False))
               for name, text in prompts.items()}
    base = encoded[baseline]
    rows = []
    for name, enc in encoded.items():
        cmp = compare_text(base, enc, concept)
        for ec in cmp.encoders:
            for layer in range(ec.concept_cos.shape[1]):
                rows.append(dict(concept=concept, variant=name, encoder=ec.name, layer=layer,
                                 concept_cos=float(ec.concept_cos[:, layer].mean()),
                                 concept_cos_last=float(ec.concept_cos[-1, layer]), eos_cos=float(ec.eos_cos[layer]),
                                 seq_flat_cos=float(ec.seq_flat_cos[layer]), seq_mean_cos=float(ec.seq_mean_cos[layer])))
        rows.append(dict(concept=concept, variant=name, encoder="conditioning", layer=-1,
                         concept_cos=cmp.concept_cos_mean, concept_cos_last=float(cmp.concept_cos[-1]),
                         eos_cos=cmp.pooled_cos, seq_flat_cos=cmp.seq_flat_cos, seq_mean_cos=cmp.seq_mean_cos))
    control = {(r["encoder"], r["layer"]): r for r in rows if r["variant"] == control}
    for r in rows:
        # the baseline is the reference of every cosine (1 against itself): it has no Δ against the control
        c = {} if r["variant"] == baseline else control.get((r["encoder"], r["layer"]), {})
        r["delta_vs_repetition"] = r["concept_cos"] - c.get("concept_cos", float("nan"))
        r["delta_last_vs_repetition"] = r["concept_cos_last"] - c.get("concept_cos_last", float("nan"))
    return rows
