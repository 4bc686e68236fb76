"""Applying interventions: ``intervene(pipe, configs, prompt)`` installs forward hooks for a ``with`` block and
yields an ``Intervened`` to call the pipeline through.

    >>> from attnprobe import AttentionEdit, intervene
    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with intervene(pipe, AttentionEdit(0.5, calls=(0, 1)), "a picture of dog", concept="dog") as run:
    ...     out = run(num_inference_steps=2, height=64, width=64, output_type="latent")
    >>> run.notes[0]["intervention"]
    'AttentionEdit(scale=0.5, calls=(0, 1))'

What is hooked (and removed in ``finally``; no attention processor is replaced):

- the denoiser (pre-forward): counts the denoiser calls of each pipeline call, reads the timestep and the batch
  layout, and for ``ConditioningEdit`` hands the denoiser a copy of ``encoder_hidden_states`` edited at the
  concept's positions of the conditional rows;
- each edited site (pre-forward of its ``Attention`` module), for ``AttentionEdit(renormalize=True)``: adds
  ``log(scale)`` (−inf for 0) at the concept's keys of the conditional rows to the ``attention_mask`` the site
  passes to its processor, only inside the edit's window (outside it, and at scale 1, the arguments are left
  untouched, so the computation is bit-identical);
- each edited site's ``to_v`` (forward), for ``AttentionEdit(renormalize=False)``: multiplies the concept's
  value vectors by ``scale``.

``NegativePrompt`` and ``SafeLatentDiffusion`` are arguments of the pipeline call (and, for SLD, another pipeline
object sharing the components), which ``Intervened.__call__`` supplies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from typing import Iterator, Sequence

import torch

from ..capture.denoiser_call import DenoiserCall, first_value
from ..capture.encoders import pipeline_encoding
from ..capture.families import family_of
from ..capture.passes import blocks, guidance_on
from ..capture.sites import denoiser_of, list_sites, select_sites
from ..errors import AttnprobeError, InterventionError
from ..text.encode import encode_text, text_unsupported
from ..text.tokens import find_concept, token_layout
from .configs import (
    INTERVENTIONS,
    KINDS,
    AttentionEdit,
    ConditioningEdit,
    Intervention,
    NegativePrompt,
    SafeLatentDiffusion,
    parse_interventions,
)

__all__ = ["intervene", "Intervened", "denoiser_timesteps"]

NOTES_ATTR = "_attnprobe_interventions"  # on the denoiser while a block is open; read by probe()

#: families whose every site cross-attends from the image positions to one text encoder's positions (a UNet's CLIP
#: pair is one sequence): the edits find the concept's keys and values there; a UNet's from its tokenizer, the others'
#: from the pipeline's own ``encode_prompt`` labelled as the probe labels keys (``capture.encoders``)
EDITABLE = ("unet", "pixart", "sana", "kandinsky3", "lumina")
#: of those, the families whose attention processors add ``attention_mask`` to the logits (Lumina-Next's takes it as a
#: boolean: an added bias would be lost), so ``AttentionEdit(renormalize=True)`` can hand them the edit as a mask
ADDITIVE_MASK = ("unet", "pixart", "sana", "kandinsky3")


def _why_not(family, pipe) -> str:
    """Why the attention and conditioning edits do not apply to a family's denoiser (one clause)."""
    if family.refused:
        return "which attnprobe refuses"
    if family.name == "hunyuandit":
        return ("whose sites cross-attend to two encoders' positions (CLIP's, then T5's, each projected), which the "
                "edits do not tell apart")
    if set(family.kinds) & {"joint", "single"}:
        return ("whose text keys share one softmax with the image keys and the text positions' own queries (joint "
                "attention): scaling the concept's values or masking its keys there would change what the text reads "
                "as well, which these edits do not define")
    return "which no edit knows"

def denoiser_timesteps(pipe, steps: int) -> list[float]:
    """The scheduler timesteps of a ``steps``-step call, one per denoiser call (a copy of the scheduler is set).

    Examples:
        >>> from attnprobe.testing import tiny_sd_pipeline
        >>> len(denoiser_timesteps(tiny_sd_pipeline(scheduler="pndm"), 10))   # PNDM: 11 calls for 10 steps
        11
    """
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(int(steps))
    return [float(t) for t in scheduler.timesteps]


def _check_window(edit: AttentionEdit, timesteps: list[float], steps: int, scheduler: str) -> None:
    n = len(timesteps)
    if edit.calls is not None and edit.calls[1] >= n:
        raise InterventionError(
            f"{edit!r}: calls {edit.calls[0]}-{edit.calls[1]} lie outside the run: {steps} steps with {scheduler} make "
            f"{n} denoiser calls, 0-{n - 1}. Give a window within 0-{n - 1}."
        )
    if edit.timesteps is not None:
        hi, lo = edit.timesteps
        inside = [t for i, t in enumerate(timesteps) if lo <= t <= hi and (edit.calls is None or
                                                                           edit.calls[0] <= i <= edit.calls[1])]
        if not inside:
            shown = ", ".join(f"{t:g}" for t in timesteps[:3]) + (f", …, {timesteps[-1]:g}" if n > 3 else "")
            raise InterventionError(
                f"{edit!r}: no denoiser call of the run falls in the window ({steps} steps with {scheduler}: "
                f"timesteps {shown}). Give timesteps (high, low) that cover some of them."
            )


def _concept_positions(tokenizer, prompt: str, concept: str, n_keys: int) -> list[int]:
    occurrences = find_concept(token_layout(tokenizer, prompt, n_keys), concept, where=f"the prompt {prompt!r}")
    return sorted({p for occ in occurrences for p in occ})


class Intervened:
    """What ``intervene`` yields: call it as the pipeline (prompts and the interventions' arguments filled in).

    Attributes:
        pipe: the pipeline to call and to probe (``StableDiffusionPipelineSafe`` sharing the components when a
            ``SafeLatentDiffusion`` is among the interventions, else the given pipeline).
        prompts: the prompts. interventions: the configs, each with its concept.
        notes: one dict per intervention, as ``probe`` writes them into ``store.meta["interventions"]``.
    """

    def __init__(self, pipe, interventions, prompts, concept):
        self.base = pipe
        self.pipe = pipe
        self.prompts = prompts
        self.interventions = [iv.with_concept(concept) for iv in interventions]
        self.denoiser = denoiser_of(pipe)
        family = family_of(self.denoiser)
        self.family = family.name
        # a negative prompt edits nothing of the denoiser: any pipeline that takes one can have it; the edits find the
        # conditional rows from the batch recipe of a pipeline that says whether guidance is on, and edit keys and
        # values of sites that cross-attend to one encoder's positions
        negative_only = all(isinstance(iv, NegativePrompt) for iv in self.interventions)
        has_property = isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property)
        self.edits_rows = family.name in EDITABLE and (has_property or not negative_only)
        if not self.edits_rows and not negative_only:
            raise InterventionError(
                f"interventions other than negative-prompt edit the conditional rows' attention to the concept at sites "
                f"that cross-attend to one text encoder's positions (the families {', '.join(EDITABLE)}); "
                f"{type(pipe).__name__}'s denoiser, {type(self.denoiser).__name__}, is of the {family.name!r} family, "
                + _why_not(family, pipe) + ": use negative-prompt there"
            )
        self.tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
        self.n_keys = int(getattr(self.tokenizer, "model_max_length", 77) or 77) if self.tokenizer else 77
        self.sld = next((iv for iv in self.interventions if isinstance(iv, SafeLatentDiffusion)), None)
        self.negative = next((iv for iv in self.interventions if isinstance(iv, NegativePrompt)), None)
        self.attention = [iv for iv in self.interventions if isinstance(iv, AttentionEdit)]
        self.conditioning = [iv for iv in self.interventions if isinstance(iv, ConditioningEdit)]
        reencodes = [e for e in self.conditioning if e.mode != "project" or self.family == "unet"]
        if reencodes and text_unsupported(pipe):
            raise InterventionError(f"{reencodes[0]!r} re-encodes the prompt: {text_unsupported(pipe)}"
                                    + ("" if self.family == "unet" else "; mode='project' reads the pipeline's own "
                                       "encoding"))
        renormalized = [e for e in self.attention if e.renormalize and self.family not in ADDITIVE_MASK]
        if renormalized:
            raise InterventionError(
                f"{renormalized[0]!r}: {type(self.denoiser).__name__}'s attention processors take the mask as a "
                "boolean, so the edit cannot be handed to them as an added mask: use renormalize=False (scales the "
                "concept's values)")
        self.handles: list = []
        self.previous_notes: list | None = None
        self.positions: dict[int, list[list[int]]] = {}  # id(edit) → per prompt, the concept's key positions
        self.replacements: dict[int, torch.Tensor] = {}  # id(conditioning edit) → [prompt, token, hidden] or [hidden]
        self.edit_sites: dict[int, set[str]] = {}
        self.encodings: dict = {}  # text → TextEncoding (non-UNet families)
        self.notes = [self._note(iv) for iv in self.interventions]
        self._reset()

    # ------------------------------------------------------------------ setup
    def _prepare(self) -> None:
        for kind in (SafeLatentDiffusion, NegativePrompt):
            if sum(isinstance(iv, kind) for iv in self.interventions) > 1:
                raise InterventionError(f"more than one {kind.__name__} in {self.interventions}: compose at most one")
        if self.attention or self.conditioning:
            if self.tokenizer is None:
                raise InterventionError(f"{type(self.base).__name__} has no tokenizer to find the concept's tokens")
        sites = list_sites(self.denoiser)
        for edit in self.attention + self.conditioning:
            self.positions[id(edit)] = [self._positions(p, edit.concept) for p in self.prompts]
        for edit in self.attention:
            chosen = select_sites(sites, edit.sites)
            self.edit_sites[id(edit)] = {s.name for s in chosen}
            for site in chosen:
                attn = self.denoiser.get_submodule(site.name)
                if not edit.renormalize and (getattr(attn, "to_v", None) is None
                                             or getattr(attn, "fused_projections", False)):
                    raise InterventionError(f"{edit!r}: site {site.name} has fused projections (no to_v to scale); "
                                            "unfuse them or use renormalize=True")
        for edit in self.conditioning:
            self.replacements[id(edit)] = self._replacement(edit)
        if self.sld is not None:
            self.pipe = _safe_pipeline(self.base)
            self.pipe.safety_concept = self.sld.concept

    def _positions(self, prompt: str, concept: str) -> list[int]:
        """The concept's key positions in a prompt's text keys (every mention)."""
        if self.family == "unet":
            return _concept_positions(self.tokenizer, prompt, concept, self.n_keys)
        layout = self._encoding(prompt).layout
        return sorted({p for occ in find_concept(layout, concept, where=f"the prompt {prompt!r}") for p in occ})

    def _encoding(self, text: str):
        """A text as the pipeline encodes it (``capture.encoders.pipeline_encoding``), once per text."""
        if text not in self.encodings:
            try:
                self.encodings[text] = pipeline_encoding(self.base, text)
            except AttnprobeError as exc:
                raise InterventionError(f"the edits find the concept's keys from the pipeline's encoding: {exc}") from None
        return self.encodings[text]

    def _replacement(self, edit: ConditioningEdit) -> torch.Tensor:
        if edit.mode == "project":
            alone = encode_text(self.base, edit.concept, attentions=False) if self.family == "unet" else (
                self._encoding(edit.concept))
            where = sorted({p for occ in find_concept(alone.layout, edit.concept) for p in occ})
            u = alone.conditioning[where].double().mean(dim=0)
            return u / u.norm()  # [hidden]
        rows = []
        for prompt, positions in zip(self.prompts, self.positions[id(edit)]):
            word = edit.word if edit.mode == "word" else None
            rows.append(encode_text(self.base, prompt, attentions=False, mask_positions=positions,
                                    mask_with=word).conditioning)
        return torch.stack(rows)  # [prompt, token, hidden]

    def _install(self) -> None:
        self.previous_notes = getattr(self.denoiser, NOTES_ATTR, None)
        setattr(self.denoiser, NOTES_ATTR, list(self.previous_notes or []) + self.notes)
        self.handles.append(self.denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True))
        renorm = {name for e in self.attention if e.renormalize for name in self.edit_sites[id(e)]}
        raw = {name for e in self.attention if not e.renormalize for name in self.edit_sites[id(e)]}
        for name in sorted(renorm):
            hook = functools.partial(self._on_site_call, name)
            self.handles.append(self.denoiser.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        for name in sorted(raw):
            hook = functools.partial(self._on_values, name)
            self.handles.append(self.denoiser.get_submodule(name).to_v.register_forward_hook(hook))

    def _remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.previous_notes is None:
            if hasattr(self.denoiser, NOTES_ATTR):
                delattr(self.denoiser, NOTES_ATTR)
        else:
            setattr(self.denoiser, NOTES_ATTR, self.previous_notes)

    def _note(self, iv) -> dict:
        if isinstance(iv, AttentionEdit):
            shows = ("the edited attention (softmax with the edit's mask)" if iv.renormalize else
                     "the softmax before scaling: the denoiser used scale × these weights at the concept's tokens")
        elif isinstance(iv, SafeLatentDiffusion):
            shows = "as generated; batch rows [uncond, cond, safety concept], all labelled cond: row 1 is the cond pass"
        else:
            shows = "the attention as generated with the changed " + (
                "conditioning" if isinstance(iv, ConditioningEdit) else "unconditional prompt")
        return {"intervention": repr(dataclasses.replace(iv, concept=None)), "concept": iv.concept, "maps": shows}

    # ------------------------------------------------------------------ calls
    def _reset(self) -> None:
        self.call = -1
        self.timestep = float("inf")
        self.guidance = None  # the guidance_scale of the pipeline call in progress
        self.rows: list[tuple[int, int]] = []
        self.scaled: dict[tuple[str, int, str], float] = {}

    def _blocks(self) -> list[str]:
        """The passes of the denoiser batch's blocks in order (``attnprobe.capture.passes.blocks``)."""
        sld = self.sld is not None and self.pipe is not self.base
        on = guidance_on(self.pipe, self.guidance)  # no property (PixArt): the call's guidance_scale > 1
        if on is None and not sld:
            raise InterventionError(f"{type(self.pipe).__name__} does not say whether guidance is on "
                                    "(no do_classifier_free_guidance): the conditional rows are unknown")
        return [p for p, _ in blocks(self.pipe, bool(on) or sld, sld)]

    def _conditional_rows(self, batch: int) -> list[tuple[int, int]]:
        """``(batch row, prompt index)`` of the conditional rows: the ``cond`` block of the batch."""
        order, n_prompts = self._blocks(), len(self.prompts)
        passes = len(order)
        per_prompt, rest = divmod(batch, passes * n_prompts)
        if rest or not per_prompt:
            raise InterventionError(
                f"the denoiser batch has {batch} rows, not {passes} passes × {n_prompts} prompts × images per "
                "prompt: "
                f"call the pipeline with the prompts given to intervene ({self.prompts})"
            )
        first = order.index("cond") * n_prompts * per_prompt
        return [(first + j, j // per_prompt) for j in range(n_prompts * per_prompt)]

    def _on_denoiser_call(self, module, args, kwargs):
        call = DenoiserCall.read(args, kwargs)
        t = first_value(call.timestep)
        if t > self.timestep:  # the pipeline was called again without going through the session
            self.call = -1
        self.call += 1
        self.timestep = t
        if not self.edits_rows:  # a negative prompt alone: the probe's own labels say which row is which
            return None
        self.rows = self._conditional_rows(call.batch)
        if not self.conditioning:
            return None
        if call.image_prompt:
            raise InterventionError(f"{self.conditioning[0]!r} edits the text conditioning, but the denoiser got "
                                    "IP-Adapter's (text, image prompt) states, which it does not edit: unload the IP-Adapter")
        return DenoiserCall.with_states(args, kwargs, self._edit_conditioning(call.states))

    def _edit_conditioning(self, states: torch.Tensor) -> torch.Tensor:
        states = states.clone()
        for edit in self.conditioning:
            replacement = self.replacements[id(edit)]
            for row, prompt in self.rows:
                positions = self.positions[id(edit)][prompt]
                if edit.mode == "project":
                    v = states[row, positions].double()
                    u = replacement.to(v.device)
                    states[row, positions] = (v - (v @ u)[:, None] * u).to(states.dtype)
                else:
                    # a pipeline may keep fewer positions than its encoder read (Kandinsky 3 cuts the padding)
                    if replacement.shape[2] != states.shape[2] or positions[-1] >= min(
                            replacement.shape[1], states.shape[1]) or (
                            self.family == "unet" and replacement.shape[1] != states.shape[1]):
                        raise InterventionError(f"{edit!r}: the denoiser got conditioning of shape "
                                                f"{tuple(states.shape[1:])}, the re-encoded prompt has "
                                                f"{tuple(replacement.shape[1:])} (the concept at {positions})")
                    states[row, positions] = replacement[prompt, positions].to(states)
        return states

    def _active(self, edit: AttentionEdit, site: str) -> bool:
        if site not in self.edit_sites[id(edit)] or edit.scale == 1.0 or self.call < 0:
            return False
        if edit.calls is not None and not edit.calls[0] <= self.call <= edit.calls[1]:
            return False
        return edit.timesteps is None or edit.timesteps[1] <= self.timestep <= edit.timesteps[0]

    def _on_site_call(self, site, module, args, kwargs):
        edits = [e for e in self.attention if e.renormalize and self._active(e, site)]
        if not edits:
            return None  # the original arguments, untouched: bit-identical outside the window
        hidden = args[0] if args else kwargs["hidden_states"]
        states = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        n_keys = states.shape[1]
        bias = torch.zeros(hidden.shape[0], 1, n_keys, dtype=hidden.dtype, device=hidden.device)
        for edit in edits:
            value = math.log(edit.scale) if edit.scale > 0 else float("-inf")
            for row, prompt in self.rows:
                bias[row, 0, self._keys(edit, prompt, n_keys)] += value
        in_args = len(args) > 2
        mask = args[2] if in_args else kwargs.get("attention_mask")
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(~mask, float("-inf"))
            bias = (mask.unsqueeze(1) if mask.ndim == 2 else mask).to(bias.dtype) + bias
        if in_args:
            return (*args[:2], bias, *args[3:]), kwargs
        return args, {**kwargs, "attention_mask": bias}

    def _keys(self, edit, prompt: int, n_keys: int) -> list[int]:
        positions = self.positions[id(edit)][prompt]
        if n_keys != self.n_keys and getattr(self.tokenizer, "padding_side", "right") == "left":
            # a tokenizer that pads on the left (Kolors' ChatGLM) moves the words with the number of keys
            positions = _concept_positions(self.tokenizer, self.prompts[prompt], edit.concept, n_keys)
        if positions[-1] >= n_keys:
            raise InterventionError(f"{edit!r}: the concept's positions {positions} lie past this site's {n_keys} keys")
        return positions

    def _on_values(self, site, module, args, output):
        edits = [e for e in self.attention if not e.renormalize and self._active(e, site)]
        if not edits:
            return None
        weights = torch.ones(output.shape[0], output.shape[1], 1, dtype=output.dtype, device=output.device)
        for edit in edits:
            for row, prompt in self.rows:
                weights[row, self._keys(edit, prompt, output.shape[1])] *= edit.scale
            key = (edit.concept, self.call, site)
            self.scaled[key] = self.scaled.get(key, 1.0) * edit.scale
        return output * weights

    # ------------------------------------------------------------------ public
    def __call__(self, **kwargs):
        """Call ``pipe`` with the prompts and the interventions' arguments (``negative_prompt``, SLD's ``sld_*``).

        Raises:
            InterventionError: an argument an intervention sets is also given; a window lies outside this call's
                denoiser calls (checked before generating); SLD without guidance.
        """
        for key in ("prompt", "prompt_embeds"):
            if key in kwargs:
                raise InterventionError(f"{key}= is set by intervene (prompts {self.prompts}); do not pass it")
        template = [k for k in kwargs if k in ("complex_human_instruction", "system_prompt") or k.startswith(
            "prompt_template")]
        if self.encodings and template:  # the concept's keys were found in the encoding with the default template
            raise InterventionError(f"{template[0]}= changes where the prompt's words are in the text keys; the "
                                    "edits found the concept's keys with the pipeline's default: leave it out")
        steps = kwargs.get("num_inference_steps", _default(self.pipe, "num_inference_steps", 50))
        guidance = kwargs.get("guidance_scale", _default(self.pipe, "guidance_scale", 7.5))
        self.check(steps, guidance)
        extra = {}
        if self.negative is not None:
            if kwargs.get("negative_prompt") is not None or kwargs.get("negative_prompt_embeds") is not None:
                raise InterventionError(f"{self.negative!r} sets the negative prompt; do not pass negative_prompt too")
            extra["negative_prompt"] = [self.negative.template.format(c=self.negative.concept)] * len(self.prompts)
        if self.sld is not None:
            extra.update(sld_guidance_scale=self.sld.guidance_scale, sld_warmup_steps=round(self.sld.warmup * steps),
                         sld_threshold=self.sld.threshold, sld_momentum_scale=self.sld.momentum_scale,
                         sld_mom_beta=self.sld.momentum_beta)
        self._reset()
        self.guidance = guidance
        return self.pipe(prompt=self.prompts, **extra, **kwargs)

    def check(self, steps: int, guidance: float | None = None) -> None:
        """Raise ``InterventionError`` if an edit's window lies outside a ``steps``-step call, or SLD would run with a
        ``guidance`` scale ≤ 1 (off): what a pipeline call with these settings would refuse, without generating."""
        if self.sld is not None and guidance is not None and float(guidance) <= 1:
            raise InterventionError(f"{self.sld!r} needs classifier-free guidance: guidance_scale={guidance} ≤ 1")
        if any(e.calls is not None or e.timesteps is not None for e in self.attention):
            timesteps = denoiser_timesteps(self.base, steps)
            for edit in self.attention:
                _check_window(edit, timesteps, int(steps), type(self.base.scheduler).__name__)

    def conditional_sample(self, store, prompt: int = 0, image: int = 0) -> int:
        """Index on ``store``'s sample axis of the conditional pass of a prompt (and image), from the batch layout
        of this block's last denoiser call (with SLD the probe labels all three passes ``cond``: this finds row 1).

        Raises:
            InterventionError: no denoiser call ran yet, or the store did not record that row.
        """
        if not self.edits_rows:
            found = [s.index for s in store.samples if (s.pass_label, s.prompt_index, s.image_index) == (
                "cond", prompt, image)]
            if not found:
                raise InterventionError(f"the store has no conditional sample of prompt {prompt}, image {image}")
            return found[0]
        if not self.rows:
            raise InterventionError("no denoiser call has run in this intervene block: call the pipeline first")
        per_prompt = len(self.rows) // len(self.prompts)
        row = self.rows[prompt * per_prompt + image][0]
        for s in store.samples:
            if s.row == row:
                return s.index
        raise InterventionError(f"the store has no sample for batch row {row} (prompt {prompt}, image {image}); "
                                f"it holds rows {[s.row for s in store.samples]}")

    def mass_factors(self, store, concept: str) -> torch.Tensor:
        """Per call and site of ``store``, the factor by which ``renormalize=False`` edits scaled the concept's
        attention weights in this block's last pipeline call (1 where none did): ``trajectory(store, concept,
        by_site=True) * mass_factors(store, concept)`` is the attention weight the denoiser used.

        Returns:
            float32 ``[call, site]`` (sites in ``store.sites`` order).

        Raises:
            InterventionError: the store's calls are not this block's last pipeline call.
        """
        factors = torch.ones(len(store.calls), len(store.sites))
        if not self.scaled:
            return factors
        if len(store.calls) != self.call + 1:
            raise InterventionError(f"the store has {len(store.calls)} calls, this block's last pipeline call "
                                    f"{self.call + 1}: probe one pipeline call to apply the factors")
        for j, site in enumerate(store.sites):
            for i in range(len(store.calls)):
                factors[i, j] = self.scaled.get((concept, i, site.name), 1.0)
        return factors


def _default(pipe, name: str, fallback):
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return parameter.default if parameter is not None and parameter.default is not inspect.Parameter.empty else fallback


def _safe_pipeline(pipe):
    import diffusers

    cls = getattr(diffusers, "StableDiffusionPipelineSafe", None)
    if cls is None:
        raise InterventionError(
            "SafeLatentDiffusion needs diffusers' StableDiffusionPipelineSafe, which diffusers "
            f"{diffusers.__version__} does not have (deprecated since 0.33): install a diffusers that ships it, "
            "or leave 'sld' out"
        )
    parts = {name: getattr(pipe, name, None) for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    missing = [k for k, v in parts.items() if v is None]
    if missing or getattr(pipe, "text_encoder_2", None) is not None:
        raise InterventionError(
            f"SafeLatentDiffusion runs StableDiffusionPipelineSafe, an SD 1.x/2.x pipeline; {type(pipe).__name__} "
            + (f"lacks {missing}" if missing else "has a second text encoder (SDXL)") + ": leave 'sld' out"
        )
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "deprecated", "safety checker disabled" notices
    try:
        safe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    finally:
        diffusers_logging.set_verbosity(level)
    safe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return safe


@contextlib.contextmanager
def intervene(pipe, interventions: Intervention | Sequence[Intervention], prompt: str | Sequence[str], *,
              concept: str | None = None, steps: int | None = None) -> Iterator[Intervened]:
    """Apply interventions to a pipeline for the ``with`` block; everything is removed on exit.

    Args:
        pipe: a diffusers pipeline: any that takes ``negative_prompt`` for ``NegativePrompt``; for the edits, one
            whose sites cross-attend to one encoder's positions (``EDITABLE``: UNets, PixArt, Sana, Kandinsky 3,
            Lumina-Next); ``SafeLatentDiffusion``: SD 1.x/2.x.
        interventions: one config, a name of ``INTERVENTIONS`` (with options, see ``parse_interventions``), or a
            list of them (they compose: edits add up; at most one ``NegativePrompt`` and one ``SafeLatentDiffusion``).
        prompt: the prompt(s) of the pipeline calls (the concept's tokens are found in them).
        concept: the concept of configs whose ``concept`` is None. Default: None.
        steps: when given, windows are checked against a call of this many steps now, before generating.

    Yields:
        An ``Intervened``: call it as the pipeline (``run(num_inference_steps=…, latents=…)``); probe ``run.pipe``.

    Raises:
        InterventionError: a config is malformed or cannot apply here (no concept, SLD on SDXL, two negative
            prompts, a window outside the run, an edit on a family it does not cover, saying why: joint attention,
            a boolean mask, an LLM encoder it cannot re-encode). ConceptError: an edit's concept is not in a prompt.
        UnknownSiteError: an edit's ``sites`` match no site.

    Examples:
        >>> from attnprobe.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> with intervene(pipe, NegativePrompt(), "a picture of dog", concept="dog") as run:
        ...     out = run(num_inference_steps=1, height=64, width=64, output_type="latent")
        >>> with intervene(pipe, AttentionEdit(0.0, calls=(5, 6)), "a dog", concept="dog", steps=4):
        ...     pass
        Traceback (most recent call last):
        attnprobe.errors.InterventionError: AttentionEdit(scale=0.0, calls=(5, 6), concept='dog'): calls 5-6 lie outside the run: 4 steps with DDIMScheduler make 4 denoiser calls, 0-3. Give a window within 0-3.
    """
    items = []
    if not isinstance(interventions, (str, *KINDS, list, tuple)):
        raise InterventionError(f"{interventions!r} is not an intervention: use {', '.join(k.__name__ for k in KINDS)}, "
                                f"a name of {list(INTERVENTIONS)}, or a list of them")
    for iv in [interventions] if isinstance(interventions, (str, *KINDS)) else list(interventions):
        if isinstance(iv, str):  # a name with options: "zero-attention:calls=0-3+negative-prompt"
            items += [x for row in parse_interventions({"": iv}).values() for x in row]
        elif isinstance(iv, KINDS):
            items.append(iv)
        else:
            raise InterventionError(f"{iv!r} is not an intervention: use {', '.join(k.__name__ for k in KINDS)} "
                                    f"or a name of {list(INTERVENTIONS)}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InterventionError(f"prompt must be a string or a list of strings; got {prompt!r}")
    session = Intervened(pipe, items, prompts, concept)
    session._prepare()
    if steps is not None:
        session.check(steps)
    try:
        session._install()
        yield session
    finally:
        session._remove()
