"""What each batch row was conditioned on: the evidence that checks the labels ``rows.BatchRows`` reads from the
pipeline's recipe (``passes.blocks``).

A pipeline's ``encode_prompt`` returns the text conditioning the denoiser gets (``prompt_embeds`` first, then
``negative_prompt_embeds`` where the pipeline makes them, one row per prompt and image); ``EncodeWatch`` keeps what
it returned during a pipeline call. ``verdicts`` then checks each batch row of the first denoiser call against the
encoding its label names:

| verdict | the row's ``encoder_hidden_states`` |
|---|---|
| ``True`` | equal (bit for bit) to the row of the encoding its label names |
| ``False`` | equal to another encoding's row, or unequal to a row with the same label, or equal to a row whose label names other token ids: the label contradicts the evidence |
| ``None`` | matches no encoding (the pipeline transforms its embeddings, or has no ``encode_prompt``): no evidence either way |

    >>> import torch
    >>> prompt, negative = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
    >>> states = torch.cat([negative, prompt])
    >>> verdicts(states, [("negative", 0, 0), ("prompt", 0, 0)], {"prompt": prompt, "negative": negative}, 1)
    [True, True]
    >>> verdicts(states.flip(0), [("negative", 0, 0), ("prompt", 0, 0)], {"prompt": prompt, "negative": negative}, 1)
    [False, False]

Only the first denoiser call of a pipeline call is checked against the encodings (once per pipeline call, off the
per-call path); later calls are checked against the first call's rows (``same_rows``).
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..errors import warn
from .denoiser_call import pad_rows

__all__ = ["EncodeWatch", "verdicts", "same_rows", "note_checks"]

_LISTENERS = "_attnprobe_encode_listeners"


class EncodeWatch:
    """Calls ``listener(output)`` with what the pipeline's ``encode_prompt`` returns, while installed.

    diffusers has no hook for a pipeline's methods, so the watch sets an instance attribute ``encode_prompt`` that
    calls the pipeline's own and then the listeners; every probe of the pipeline shares it, and the last to close
    restores what was there. Nothing of the model is touched.
    """

    def __init__(self, pipe, listener) -> None:
        self.pipe, self.listener = pipe, listener

    def install(self) -> None:
        pipe = self.pipe
        if pipe is None or not callable(getattr(pipe, "encode_prompt", None)):
            return
        listeners = pipe.__dict__.get(_LISTENERS)
        if listeners is None:
            listeners = _Listeners()
            before = pipe.__dict__.get("encode_prompt")  # a user's own instance attribute, restored on remove

            def encode_prompt(*args, **kwargs):
                # looked up at each call: a method patched on the class inside the probe is the one that runs
                method = before if before is not None else type(pipe).encode_prompt.__get__(pipe, type(pipe))
                listeners.lists = _prompt_lists(method, args, kwargs)
                out = method(*args, **kwargs)
                for listener in list(listeners):
                    listener(out)
                return out

            functools.update_wrapper(encode_prompt, before or type(pipe).encode_prompt)
            encode_prompt._attnprobe_before = before
            pipe.__dict__["encode_prompt"] = encode_prompt  # not setattr: DiffusionPipeline's registers config
            pipe.__dict__[_LISTENERS] = listeners
            listeners.wrapper = encode_prompt
        listeners.append(self.listener)

    def remove(self) -> None:
        pipe = self.pipe
        listeners = pipe.__dict__.get(_LISTENERS) if pipe is not None else None
        if listeners is None:
            return
        if self.listener in listeners:
            listeners.remove(self.listener)
        if not listeners:
            del pipe.__dict__[_LISTENERS]
            wrapper = listeners.wrapper
            if pipe.__dict__.get("encode_prompt") is not wrapper:
                return  # the user set their own encode_prompt inside the probe: it stays
            del pipe.__dict__["encode_prompt"]
            if wrapper._attnprobe_before is not None:
                pipe.__dict__["encode_prompt"] = wrapper._attnprobe_before


    def as_given(self, value):
        """``value`` as the pipeline call was given it: a prompt list that the last ``encode_prompt`` rewrote in place
        (Z-Image's puts each prompt into its chat template) as it was before; anything else as it is."""
        listeners = self.pipe.__dict__.get(_LISTENERS) if self.pipe is not None else None
        kept = listeners.lists.get(id(value)) if listeners is not None and isinstance(value, list) else None
        return kept[1] if kept is not None and kept[0] is value else value


def _prompt_lists(method, args, kwargs) -> dict:
    """The prompt lists an ``encode_prompt`` call was given, each ``id -> (list, copy made before it ran)``."""
    try:
        bound = inspect.signature(method).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return {}
    return {id(v): (v, list(v)) for name, v in bound.items()
            if name in ("prompt", "negative_prompt") and isinstance(v, list)}


class _Listeners(list):
    """The listeners of one pipeline's watch, the wrapper that calls them, and the prompt lists of its last call."""

    wrapper = None
    lists: dict = {}


def encodings(output) -> dict[str, torch.Tensor]:
    """The conditioning in an ``encode_prompt`` output: ``{"prompt": [row, token, hidden], "negative": ...}``.

    diffusers' ``encode_prompt`` returns ``prompt_embeds`` first; the negative prompt's embeddings are the next
    3-dimensional tensor of the same shape (SD: ``(prompt, negative)``; SDXL and SD3: ``(prompt, negative, pooled,
    negative pooled)``; PixArt and Sana: ``(prompt, mask, negative, negative mask)``)."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    lists = any(isinstance(t, list) for t in items)  # Z-Image: a [token, hidden] caption per row, its own length
    items = [pad_rows(t) if isinstance(t, list) else t for t in items]
    tensors = [t for t in items if isinstance(t, torch.Tensor) and t.dim() == 3]
    if not tensors:
        return {}
    found = {"prompt": tensors[0]}
    first = tensors[0].shape
    same = [t for t in tensors[1:] if t.shape == first or (lists and (t.shape[0], t.shape[2]) == (first[0], first[2]))]
    if same:
        found["negative"] = same[0]
    return found


def _row(tensor: torch.Tensor, prompt: int, image: int, per_prompt: int, n_prompts: int) -> torch.Tensor | None:
    """The row of an encoding for a prompt and image: encodings repeat each prompt per image, or hold one row per
    prompt."""
    if tensor.shape[0] == n_prompts * per_prompt:
        return tensor[prompt * per_prompt + image]
    if tensor.shape[0] == n_prompts:
        return tensor[prompt]
    return None


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dim() == 2 and a.shape[1:] == b.shape[1:] and a.shape[0] != b.shape[0]:  # captions zero-padded to other lengths
        longer, shorter = (a, b) if a.shape[0] > b.shape[0] else (b, a)
        return not longer[shorter.shape[0]:].any() and _equal(longer[:shorter.shape[0]], shorter)
    return a.shape == b.shape and torch.equal(a, b.to(a.device, a.dtype))


def verdicts(states, claims, found: dict[str, torch.Tensor], per_prompt: int, ids=None) -> list[bool | None]:
    """Per batch row, whether its conditioning is what its label says.

    Args:
        states: the denoiser call's ``encoder_hidden_states``, ``[row, token, hidden]`` (anything else: no evidence).
        claims: per row ``(text, prompt, image)``: which encoding the label says (``"prompt"``, ``"negative"``,
            ``"safety"``), of which prompt and image.
        found: the pipeline call's encodings (``encodings``).
        per_prompt: images per prompt.
        ids: per ``(text, prompt)`` the token ids the text encoders read (a tuple), where known: two labels with
            other ids must not share a conditioning.

    Returns:
        ``True``, ``False`` or ``None`` per row (see the module's table).
    """
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[0] != len(claims):
        return [None] * len(claims)
    n_prompts = max((p for _, p, _ in claims), default=0) + 1
    out: list[bool | None] = []
    candidates = [(name, p, i) for name, t in found.items()
                  for p in range(n_prompts) for i in range(per_prompt)
                  if _row(t, p, i, per_prompt, n_prompts) is not None]
    for row, (text, prompt, image) in enumerate(claims):
        claimed = found.get(text)
        expect = _row(claimed, prompt, image, per_prompt, n_prompts) if claimed is not None else None
        if expect is not None and _equal(states[row], expect):
            out.append(True)
            continue
        others = [(n, p) for n, p, i in candidates
                  if (n, p) != (text, prompt) and _equal(states[row], _row(found[n], p, i, per_prompt, n_prompts))]
        out.append(False if others else None)
    # rows with one label share one conditioning; labels that read other token ids do not
    groups: dict[tuple, list[int]] = {}
    for row, (text, prompt, _) in enumerate(claims):
        groups.setdefault((text, prompt), []).append(row)
    for rows in groups.values():
        if any(not torch.equal(states[rows[0]], states[r]) for r in rows[1:]):
            for r in rows:
                out[r] = False
    ids = ids or {}
    keys = list(groups)
    for a, ka in enumerate(keys):
        for kb in keys[a + 1:]:
            if ids.get(ka) is None or ids.get(kb) is None or ids[ka] == ids[kb]:
                continue
            if torch.equal(states[groups[ka][0]], states[groups[kb][0]]):
                for r in groups[ka] + groups[kb]:
                    out[r] = False
    return out


def same_rows(states, first, pairs: list[tuple[int, int] | None]) -> list[bool]:
    """Per ``(row, first_row)`` pair, whether row ``row`` of a later denoiser call has the conditioning of row
    ``first_row`` of the pipeline call's first denoiser call (``False`` for ``None``; ``True`` without tensors to
    compare)."""
    if not isinstance(states, torch.Tensor) or not isinstance(first, torch.Tensor):
        return [pair is not None for pair in pairs]
    return [pair is not None and _equal(states[pair[0]], first[pair[1]]) for pair in pairs]


def note_checks(record: dict, checks) -> list[str]:
    """Write the processor checks of ``cross.ProbeProcessor`` (``(site, processor, relative error or None,
    tolerance, conditioning)``, once per site) into ``record`` (``store.meta["processor_check"]``) and warn once per
    processor class about the sites whose output is not the recorded probabilities times the values, and once about
    sites whose ``encoder_hidden_states`` are not the denoiser's.

    ``record[site]``: ``{"processor", "verdict": "equal" | "differs" | "not checked", "relative_error",
    "tolerance", "conditioning": "equal" | "differs" | "not checked"}``.

    Returns:
        the sites whose conditioning differs from the denoiser's (their rows' labels are not evidence for them).
    """
    differ: dict[str, list] = {}
    moved = []
    for site, name, error, tolerance, same in checks:
        verdict = "not checked" if error is None else "equal" if error <= tolerance else "differs"
        conditioning = "not checked" if same is None else "equal" if same else "differs"
        record[site] = {"processor": name, "verdict": verdict, "relative_error": error, "tolerance": tolerance,
                        "conditioning": conditioning}
        if verdict == "differs":
            differ.setdefault(name, []).append((site, error, tolerance))
        if conditioning == "differs":
            moved.append(site)
    for name, sites in differ.items():
        worst = max(sites, key=lambda s: s[1])
        warn(
            f"{len(sites)} site(s) {[s[0] for s in sites]}: the output of their processor {name} is not the recorded "
            f"probabilities times the values (relative error up to {worst[1]:.2g} > {worst[2]:g}): the processor edits "
            "or adds attention (Prompt-to-Prompt reweighting, IP-Adapter, …), so the store holds the attention the "
            "model would have computed without that edit (store.meta['processor_check'])",
        )
    if moved:
        warn(
            f"{len(moved)} site(s) {moved[:3]}{' …' if len(moved) > 3 else ''} attend to other encoder_hidden_states "
            "than the denoiser was called with (a hook or processor changed them on the way): the row labels, "
            "checked at the denoiser's input, may not describe what these sites saw (store.meta['row_evidence'] is "
            "'contradicted')",
        )
    return moved
