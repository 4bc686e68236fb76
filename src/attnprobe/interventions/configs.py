"""The interventions as configs: what each one edits, where and when, as a frozen dataclass with a readable
``repr`` (the label a store's ``meta["interventions"]`` and a study's tables carry).

    >>> AttentionEdit(scale=0.0, calls=(0, 3))
    AttentionEdit(scale=0.0, calls=(0, 3))
    >>> INTERVENTIONS["zero-attention"]
    AttentionEdit(scale=0.0)

Each intervention is a frozen dataclass (a config, with a readable ``repr``); ``intervene`` (``attnprobe.interventions.apply``)
applies any number of them to one pipeline for the ``with`` block and removes everything in ``finally``. No
processor is replaced (the edits are forward hooks on the attention modules, their ``to_v`` projections and the
denoiser), so a ``probe`` may be opened inside or outside the block, and afterwards the pipeline generates
bit-identical images with the same processor objects.

| config | what it changes | recorded maps |
|---|---|---|
| ``AttentionEdit`` | the concept tokens' attention at chosen sites and denoiser calls (Prompt-to-Prompt reweight) | the edited maps (``renormalize=True``); the softmax before scaling (``False``) |
| ``ConditioningEdit`` | the conditioning vectors (``encoder_hidden_states``) at the concept's positions | as generated |
| ``NegativePrompt`` | the unconditional prompt of classifier-free guidance (``negative_prompt="{c}"``) | as generated (cond pass) |
| ``SafeLatentDiffusion`` | the guidance: diffusers' ``StableDiffusionPipelineSafe`` (Schramowski et al. 2023) | as generated (cond row) |

Edits apply to the conditional rows of the denoiser batch only (diffusers' layout: ``[uncond × N, cond × N]``
with guidance, ``N`` rows without; SLD adds ``safety × N``; Lumina-Next puts the prompts' rows first), at *every*
mention of the concept in the prompt: its key positions as the tokenizer lays out a UNet's CLIP keys, or, for PixArt,
Sana, Kandinsky 3 and Lumina-Next, as the probe labels the keys the pipeline's own ``encode_prompt`` makes (a
template's positions are not the concept's). Joint-attention families take ``NegativePrompt`` only
(``attnprobe.interventions.apply.EDITABLE`` lists the families the edits cover).
While a block is open the denoiser lists the active interventions, and ``probe`` copies them into
``store.meta["interventions"]`` (one dict each: its ``repr``, concept, and what the maps show).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Union

from ..capture.sites import SiteSelector
from ..errors import ArgumentError, InterventionError

__all__ = [
    "AttentionEdit",
    "ConditioningEdit",
    "NegativePrompt",
    "SafeLatentDiffusion",
    "Intervention",
    "INTERVENTIONS",
    "parse_interventions",
]


class _Config:
    """A readable ``repr``: the class and the fields that differ from their defaults."""

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def with_concept(self, concept: str | None):
        """This config with ``concept`` filled in (its own concept wins). Raises InterventionError: neither is set."""
        if self.concept is not None:
            return self
        if concept is None:
            raise InterventionError(
                f"{self!r} has no concept: give intervene(..., concept='dog') or {type(self).__name__}(concept='dog')"
            )
        return dataclasses.replace(self, concept=concept)


def _window(name: str, value, kind: type):
    if value is None:
        return None
    try:
        a, b = value
        a, b = kind(a), kind(b)
    except (TypeError, ValueError):
        raise InterventionError(f"{name}={value!r} is not a pair (first, last)") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise InterventionError(f"{name}={value!r} must be finite")
    return a, b


@dataclass(frozen=True, repr=False)
class AttentionEdit(_Config):
    """Scale (or zero) the attention that image positions pay to a concept's tokens: Prompt-to-Prompt's "reweight"
    (Hertz et al. 2022), on chosen sites and a window of denoiser calls or timesteps.

    With ``renormalize=True`` (default) the edited probabilities are
    ``p'[token] ∝ p[token] · (scale if token is the concept's else 1)``, i.e.
    ``softmax(q·kᵀ·attn.scale + mask + log(scale)·1[concept])``: an additive attention mask, handed to the site
    together with any mask it already gets, so every installed processor (SDPA, classic, xformers…) computes it
    and a probe records exactly these maps (they sum to 1 over ``token``; ``scale=0`` gives the concept 0 and the
    other tokens ``p / (1 − p_concept)``). With ``renormalize=False`` (Prompt-to-Prompt's own form) the weights
    are ``p · scale`` at the concept and ``p`` elsewhere (rows sum to ``1 − (1 − scale)·p_concept``), computed by
    scaling the concept's *value* vectors (``Σ p·w·v = softmax(…)·(w ⊙ v)``, exact); a probe then records the
    softmax before scaling, and ``Intervened.mass_factors`` gives the factor to apply.

    Args:
        scale: factor on the concept's attention, ≥ 0: 0 removes it, 1 changes nothing (bit-identical).
        renormalize: see above. Default True.
        sites: which sites (as ``probe``: names, globs, a list or a predicate). Default: every cross-attention site.
        calls: ``(first, last)`` denoiser calls of each pipeline call, inclusive, from 0. Default: every call.
        timesteps: ``(high, low)`` scheduler timesteps, inclusive. Default: every timestep. With ``calls``, both
            must hold.
        concept: the word or phrase. Default: the concept given to ``intervene``.

    Raises:
        InterventionError: a negative or non-finite scale, a malformed window.

    Examples:
        >>> AttentionEdit(scale=0.5, calls=(0, 3), sites="up_blocks.*")
        AttentionEdit(scale=0.5, sites='up_blocks.*', calls=(0, 3))
    """

    scale: float
    renormalize: bool = True
    sites: SiteSelector = None
    calls: tuple[int, int] | None = None
    timesteps: tuple[float, float] | None = None
    concept: str | None = None

    def __post_init__(self):
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale < 0:
            raise InterventionError(f"AttentionEdit scale={self.scale!r}: give a finite number ≥ 0 (0 removes)")
        calls = _window("calls", self.calls, int)
        if calls is not None and not 0 <= calls[0] <= calls[1]:
            raise InterventionError(f"AttentionEdit calls={self.calls!r}: give (first, last) with 0 ≤ first ≤ last")
        steps = _window("timesteps", self.timesteps, float)
        object.__setattr__(self, "calls", calls)
        object.__setattr__(self, "timesteps", None if steps is None else (max(steps), min(steps)))


CONDITIONING_MODES = ("padding", "word", "project")


@dataclass(frozen=True, repr=False)
class ConditioningEdit(_Config):
    """Replace the concept tokens' text-encoder outputs before the denoiser sees them.

    Only the concept's positions of ``encoder_hidden_states`` change (every other position, the pooled
    projection of SDXL and the unconditional rows stay as encoded). A causal text encoder (CLIP) has already
    let the later tokens (the end token, the padding) read the concept: they keep what they read.

    Modes:
        ``"padding"``: the prompt re-encoded with the concept's token ids replaced by the padding id; its vectors
        at those positions (``attnprobe.text.encode_text(..., mask_positions=...)``).
        ``"word"``: the same with a neutral word's id (``word``, one token) at each of the concept's positions.
        ``"project"``: each concept vector ``v`` minus its component along the concept direction ``u`` (the
        unit mean vector of the concept encoded alone): ``v − (v·u)·u``, the projection SAFREE (Yoon et al. 2025)
        applies to token embeddings.

    Args:
        mode: ``"padding"`` (default), ``"word"`` or ``"project"``.
        word: the neutral word for ``mode="word"``. Default ``"thing"``.
        concept: the word or phrase. Default: the concept given to ``intervene``.

    Raises:
        InterventionError: an unknown mode.

    Examples:
        >>> ConditioningEdit(mode="word", word="object")
        ConditioningEdit(mode='word', word='object')
    """

    mode: str = "padding"
    word: str = "thing"
    concept: str | None = None

    def __post_init__(self):
        if self.mode not in CONDITIONING_MODES:
            raise InterventionError(f"ConditioningEdit mode={self.mode!r} is not one of {CONDITIONING_MODES}")


@dataclass(frozen=True, repr=False)
class NegativePrompt(_Config):
    """The usual practice: name the concept in the negative prompt (the unconditional pass of guidance).

    Args:
        template: the negative prompt, ``{c}`` standing for the concept. Default ``"{c}"``.
        concept: Default: the concept given to ``intervene``.

    Examples:
        >>> NegativePrompt("blurry, {c}")
        NegativePrompt(template='blurry, {c}')
    """

    template: str = "{c}"
    concept: str | None = None

    def __post_init__(self) -> None:
        try:
            filled = self.template.format(c="x")
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise InterventionError(
                f"NegativePrompt template={self.template!r}: only {{c}} (the concept) may be filled in ({exc!r})"
            ) from None
        if not filled.strip():
            raise InterventionError("NegativePrompt template is empty")


@dataclass(frozen=True, repr=False)
class SafeLatentDiffusion(_Config):
    """Safe Latent Diffusion's guidance away from a concept (Schramowski et al. 2023, CVPR), with the concept as
    SLD's "safety concept", run by diffusers' ``StableDiffusionPipelineSafe`` built from the pipeline's own
    components (SD 1.x/2.x only). Defaults are diffusers' ``SafetyConfig.MEDIUM``, with the warm-up given as a
    share of the steps (MEDIUM: 10 of 50) so that short runs are guided too.

    The denoiser batch is then ``[uncond, cond, safety concept]``; a probe, which knows only the two passes of
    classifier-free guidance, labels all three rows ``cond`` (image 0, 1, 2): the conditional one is
    ``Intervened.conditional_sample(store)``.

    Args:
        guidance_scale: ``sld_guidance_scale``. Default 1000. warmup: share of the steps before SLD applies
            (``sld_warmup_steps = round(warmup · steps)``). Default 0.2. threshold, momentum_scale, momentum_beta:
            ``sld_threshold`` (0.01), ``sld_momentum_scale`` (0.3), ``sld_mom_beta`` (0.4).
        concept: Default: the concept given to ``intervene``.
    """

    guidance_scale: float = 1000.0
    warmup: float = 0.2
    threshold: float = 0.01
    momentum_scale: float = 0.3
    momentum_beta: float = 0.4
    concept: str | None = None

    def __post_init__(self):
        if not 0 <= self.warmup <= 1:
            raise InterventionError(f"SafeLatentDiffusion warmup={self.warmup!r} is a share of the steps, in [0, 1]")
        if not self.guidance_scale > 1:
            raise InterventionError(f"SafeLatentDiffusion guidance_scale={self.guidance_scale!r} must be > 1 "
                                    "(≤ 1 turns SLD off)")


Intervention = Union[AttentionEdit, ConditioningEdit, NegativePrompt, SafeLatentDiffusion]
KINDS = (AttentionEdit, ConditioningEdit, NegativePrompt, SafeLatentDiffusion)

#: Ready-made interventions by name (the CLI's ``--interventions``); each takes the study's concept.
INTERVENTIONS: dict[str, Intervention] = {
    "zero-attention": AttentionEdit(scale=0.0),
    "zero-attention-raw": AttentionEdit(scale=0.0, renormalize=False),
    "pad-conditioning": ConditioningEdit(mode="padding"),
    "neutral-conditioning": ConditioningEdit(mode="word"),
    "project-conditioning": ConditioningEdit(mode="project"),
    "negative-prompt": NegativePrompt(),
    "sld": SafeLatentDiffusion(),
}


# ---------------------------------------------------------------------------------------------- parsing
def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ArgumentError(f"{text!r} is not true/false")


def _pair(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        match = re.fullmatch(r"\s*([\d.]+)\s*-\s*([\d.]+)\s*", text)
        if not match:
            raise ArgumentError(f"{text!r} is not a range such as 0-3")
        return kind(match.group(1)), kind(match.group(2))

    return parse


_OPTIONS: dict[type, dict[str, Callable[[str], object]]] = {
    AttentionEdit: {"scale": float, "renormalize": _bool, "sites": str, "calls": _pair(int),
                    "timesteps": _pair(float), "concept": str},
    ConditioningEdit: {"mode": str, "word": str, "concept": str},
    NegativePrompt: {"template": str, "concept": str},
    SafeLatentDiffusion: {"guidance_scale": float, "warmup": float, "threshold": float, "momentum_scale": float,
                          "momentum_beta": float, "concept": str},
}


def _parse_one(text: str) -> Intervention:
    name, *options = [p.strip() for p in text.split(":")]
    if name not in INTERVENTIONS:
        raise InterventionError(f"unknown intervention {name!r}: use one of {list(INTERVENTIONS)}")
    config = INTERVENTIONS[name]
    allowed = _OPTIONS[type(config)]
    changes = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise InterventionError(f"{name}: option {option!r} is not key=value with a key of {list(allowed)}")
        try:
            changes[key] = allowed[key](value.strip())
        except ValueError as exc:
            raise InterventionError(f"{name}: option {key}: {exc}") from None
    return dataclasses.replace(config, **changes)


def parse_interventions(spec) -> dict[str, tuple[Intervention, ...]]:
    """Rows of interventions, by label, from a spec.

    A string holds comma-separated rows; a row is ``[label=]item[+item…]``; an item is a name of
    ``INTERVENTIONS`` with options ``:key=value`` (a config field; windows as ``first-last``)::

        zero-attention,negative-prompt
        early=zero-attention:calls=0-3:sites=up_blocks.*,pad-conditioning+negative-prompt

    A row without a label is labelled by its text. A dict maps labels to configs, lists of them or such strings.

    Returns:
        ``{label: (intervention, …)}`` in the given order (empty for ``None``).

    Raises:
        InterventionError: an unknown name (says which exist), an unknown option, a bad value, a repeated label.

    Examples:
        >>> parse_interventions("zero-attention,early=zero-attention:calls=0-3")
        {'zero-attention': (AttentionEdit(scale=0.0),), 'early': (AttentionEdit(scale=0.0, calls=(0, 3)),)}
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        rows = {}
        for label, value in spec.items():
            if isinstance(value, str):
                items = tuple(_parse_one(p) for p in value.split("+"))
            elif isinstance(value, KINDS):
                items = (value,)
            else:
                items = tuple(value)
            bad = [v for v in items if not isinstance(v, KINDS)]
            if bad or not items:
                raise InterventionError(f"row {label!r}: {bad or 'nothing'} is not an intervention config "
                                        f"({', '.join(k.__name__ for k in KINDS)})")
            rows[str(label)] = items
        return rows
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    if isinstance(spec, str) and not any(e.strip() for e in entries):
        raise InterventionError(f"interventions={spec!r} names no intervention; known: {list(INTERVENTIONS)}")
    rows: dict[str, tuple[Intervention, ...]] = {}
    for entry in entries:
        if isinstance(entry, KINDS):  # a config in a list: labelled by its repr
            label, items = repr(entry), (entry,)
        else:
            entry = str(entry).strip()
            if not entry:
                continue
            head = re.split(r"[:+]", entry, maxsplit=1)[0]
            label, body = (p.strip() for p in entry.split("=", 1)) if "=" in head else (entry, entry)
            if not label or not body:
                raise InterventionError(f"row {entry!r}: give label=spec with both parts, or just a spec")
            items = tuple(_parse_one(p) for p in body.split("+"))
        if label in rows:
            raise InterventionError(f"the row label {label!r} is given twice; label rows as name=spec")
        rows[label] = items
    return rows
