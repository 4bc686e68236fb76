"""Capture-time selections of ``probe``: which denoiser calls and token positions to keep, checked before the
pipeline runs.

    >>> keep = call_filter(range(2, 5))
    >>> [i for i in range(8) if keep(i, 999.0)]
    [2, 3, 4]
    >>> keep = call_filter(lambda index, timestep: timestep > 500)
    >>> keep(0, 981.0), keep(9, 21.0)
    (True, False)
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ConceptError, ProbeError
from ..text.tokens import TokenLayout, find_concept

__all__ = ["call_filter", "check_tokens", "resolve_tokens", "concept_gaps"]

CallFilter = Callable[[int, float], bool]


def _is_int(value) -> bool:
    """Python's or numpy's int, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _from_numpy(value):
    """A numpy array of ints (0-d or 1-D) as Python's int or list of ints; anything else as it is."""
    if isinstance(value, np.ndarray) and value.ndim <= 1 and np.issubdtype(value.dtype, np.integer):
        return value.tolist()  # np.arange(10, 20)
    return value


def call_filter(calls) -> CallFilter | None:
    """``probe(calls=...)`` as a predicate ``(index, timestep) -> bool``, or ``None`` to keep every call.

    ``index`` counts the denoiser calls of one pipeline call from 0 (the same in every generation of a
    probe); ``timestep`` is the scheduler timestep the denoiser got.

    Args:
        calls: ``None`` (all), an int, a sequence, ``range`` or 1-D numpy array of ints (numpy's too), a ``slice``
            (``slice(0, 10, 2)``), or a callable ``(index, timestep) -> bool`` (e.g. ``lambda i, t: t > 500``).

    Raises:
        ProbeError: anything else, or negative indices (the number of calls is not known while generating); a
            predicate that raises when called (a wrong signature), or returns anything but a bool (Python's,
            numpy's, or a one-element bool tensor or array), at that denoiser call.
    """
    if calls is None:
        return None
    if callable(calls) and not isinstance(calls, (range, slice)):
        def keep(index: int, timestep: float) -> bool:
            try:
                answer = calls(index, timestep)
            except Exception as exc:  # inside the denoiser's hook: say what is wrong with the predicate, not where
                raise ProbeError(
                    f"calls={calls!r}: the predicate must take (index, timestep) and return a bool; called with "
                    f"({index}, {timestep}) it raised {type(exc).__name__}: {exc}") from exc
            if ((isinstance(answer, torch.Tensor) and answer.dtype == torch.bool and answer.numel() == 1)
                    or (isinstance(answer, np.ndarray) and answer.dtype == np.bool_ and answer.size == 1)):
                answer = bool(answer)
            if not isinstance(answer, (bool, np.bool_)):  # "no" or a list would keep every call without a word
                raise ProbeError(
                    f"calls={calls!r}: the predicate must return a bool; called with ({index}, {timestep}) it returned "
                    f"{type(answer).__name__} {answer!r:.60}")
            return bool(answer)
        return keep
    calls = _from_numpy(calls)
    if _is_int(calls):
        calls = [calls]
    if isinstance(calls, slice):
        for part in (calls.start, calls.stop, calls.step):
            if part is not None and (not _is_int(part) or part < 0):
                raise ProbeError(f"calls={calls!r}: a slice of denoiser calls takes non-negative ints or None")
        if calls.step == 0:
            raise ProbeError(f"calls={calls!r}: the step of a slice cannot be 0")
        start, stop, step = calls.start or 0, calls.stop, calls.step or 1
        return lambda index, timestep: index >= start and (stop is None or index < stop) and (index - start) % step == 0
    if isinstance(calls, (list, tuple, range, set, frozenset)) and all(_is_int(i) for i in calls):
        chosen = frozenset(int(i) for i in calls)
        if not chosen:
            raise ProbeError("calls=[] keeps no denoiser call; use calls=None to keep them all")
        if min(chosen) < 0:
            raise ProbeError(
                f"calls={sorted(chosen)} has negative indices; the number of denoiser calls is not known while "
                "generating: give indices from 0, a slice such as slice(40, None), or a predicate on the timestep"
            )
        return lambda index, timestep: index in chosen
    raise ProbeError(
        f"calls={calls!r} is not a denoiser-call selection: give None, an int, a list or range of ints, a slice, or "
        "a callable (index, timestep) -> bool"
    )


def check_tokens(tokens) -> tuple | None:
    """``probe(tokens=...)`` checked: ``None``, a tuple of ints (prompt positions; numpy's ints and int arrays too) or a
    tuple of strings (concepts, resolved per sample with ``find_concept``).

    Raises:
        ProbeError: an empty selection, a mix of ints and strings, or another type.
    """
    if tokens is None:
        return None
    tokens = _from_numpy(tokens)
    if isinstance(tokens, str) or _is_int(tokens):
        tokens = [tokens]
    if isinstance(tokens, (list, tuple, range)) and tokens:
        if all(_is_int(t) for t in tokens):
            return tuple(int(t) for t in tokens)
        if all(isinstance(t, str) and t.strip() for t in tokens):
            return tuple(tokens)
    raise ProbeError(
        f"tokens={tokens!r} is not a token selection: give None (every position), a concept such as 'dog', a "
        "list of concepts, or a list of prompt positions (ints)"
    )


def resolve_tokens(spec: tuple, layouts: Sequence[TokenLayout], n_keys: int) -> list[int]:
    """Sorted prompt positions kept by ``probe(tokens=spec)`` for these samples' token layouts.

    Concepts: every position of every occurrence in any sample (a batch of prompt variants keeps the union);
    samples without the concept (an empty negative prompt) do not count.

    Raises:
        ProbeError: a position outside ``0..n_keys-1``. ConceptError: a concept in none of the samples.
    """
    if all(_is_int(t) for t in spec):
        bad = [p for p in spec if not -n_keys <= p < n_keys]
        if bad:
            raise ProbeError(f"tokens={list(spec)}: positions {bad} are outside the {n_keys} text tokens (0..{n_keys - 1})")
        return sorted({p % n_keys for p in spec})
    positions: set[int] = set()
    for concept in spec:
        found, errors = False, []
        for lay in layouts:
            try:
                occurrences = find_concept(lay, concept)
            except ConceptError as exc:
                errors.append(str(exc))
                continue
            found = True
            positions.update(p for occ in occurrences for p in occ)
        if not found:
            raise ConceptError(f"probe(tokens={concept!r}): the concept is in none of this call's prompts. {errors[0]}")
    return sorted(positions)


def concept_gaps(spec: tuple, samples: Sequence, layouts: Sequence[TokenLayout]) -> dict[str, list[int]]:
    """For each concept of ``probe(tokens=spec)``: the conditional samples whose prompt does not hold it (``samples``:
    the store's ``Sample``s, ``layouts`` their token layouts). At those samples the kept positions (the union over
    every sample) are other words; an empty dict when every conditional prompt holds every concept."""
    gaps = {}
    for concept in spec:
        if _is_int(concept):
            continue
        missing = []
        for sample, lay in zip(samples, layouts):
            if sample.pass_label != "cond":
                continue  # a negative prompt without the concept is expected
            try:
                find_concept(lay, concept)
            except ConceptError:
                missing.append(sample.index)
        if missing:
            gaps[concept] = missing
    return gaps
