"""Positions on a store's axes (call, sample, token): what a user may pass to choose entries, checked once.

    >>> positions("call", slice(1, None), 4), positions("sample", -1, 3)
    ([1, 2, 3], [2])
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..errors import ArgumentTypeError, SelectionError

__all__ = ["as_index", "positions"]


def as_index(value) -> int | None:
    """``value`` as a Python int if it is an integer — a Python, numpy or 0-d torch integer, never a bool — else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype in (torch.int8, torch.uint8, torch.int16,
                                                                               torch.int32, torch.int64):
        return int(value)
    return None


def positions(axis: str, chosen, length: int) -> list[int] | None:
    """``chosen`` (None, an int, a slice or a sequence of ints; numpy ints too) as a list of non-negative positions
    on an axis.

    Raises:
        SelectionError: a position out of range (an ``IndexError``).
        ArgumentTypeError (a TypeError): not ints (bools are not positions).
    """
    if chosen is None:
        return None
    if isinstance(chosen, slice):
        return list(range(length))[chosen]
    if as_index(chosen) is not None:
        chosen = [chosen]
    if isinstance(chosen, str):  # a concept given where positions go: its letters are not positions
        hint = (": a concept's positions are store.token_indices(sample, concept)" if axis == "token" else "")
        raise ArgumentTypeError(f"{axis} positions must be an int, a slice or a list of ints; got the string "
                                f"{chosen!r}{hint}")
    try:
        items = list(chosen.tolist() if isinstance(chosen, (np.ndarray, torch.Tensor)) else chosen)
    except TypeError:
        raise ArgumentTypeError(f"{axis} positions must be an int, a slice or a list of ints; got {chosen!r}") from None
    chosen = [as_index(i) for i in items]
    if None in chosen:
        raise ArgumentTypeError(f"{axis} positions must be ints; got {items!r}")
    if any(not -length <= i < length for i in chosen):
        raise SelectionError(f"{axis} positions {chosen} are out of range: the {axis} axis has {length} entries")
    return [i % length for i in chosen]
