"""Maps of a probe's relations (``probe(relations=...)``, ``attnprobe.capture.relations``).

    >>> import attnprobe
    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with attnprobe.probe(pipe, relations="image->image", points=[(0.5, 0.5)]) as store:
    ...     _ = pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
    >>> where = relation_map(store, "image->image", store.sites[-1])
    >>> tuple(where.shape), round(float(where.sum()), 3)
    ((8, 8), 1.0)
"""

from __future__ import annotations

import operator

import torch

from ..errors import SelectionError
from ..store import AttentionStore
from ..store.records import Sample
from .measures import require_store

__all__ = ["relation_map"]


def relation_map(store: AttentionStore, relation: str, site, query: int = 0, sample: int = 0, calls=None) -> torch.Tensor:
    """One query's relation map, averaged over denoiser calls and heads, in float32.

    Args:
        store: a store recorded with ``probe(relations=...)``.
        relation: ``"image->image"``, ``"text->image"`` or ``"text->text"``.
        site: a probed site (name or ``Site``) or the module the relation was read at.
        query: the index on the query axis: a point of ``store.meta["relations"]["points"]`` (``image->image``) or a
            kept text position's index on the ``token`` axis (``store.token_positions``). Default 0.
        sample: a store sample (its index or ``Sample``). Default 0.
        calls: indices on the ``call`` axis to average: an int, a list or ``range`` of ints, or a ``slice``; ``None``:
            every call.

    Returns:
        ``[kh, kw]`` (``image->image``, ``text->image``: over the site's image grid) or ``[key]`` (``text->text``: over
        every text key): the mean over the chosen calls and the heads of the query's attention; it sums to 1 for
        self-attention and ``joint="renorm"``, to the block's share of the softmax for ``joint="exact"``.

    Raises:
        ArgumentTypeError: ``store`` is not an ``AttentionStore`` (a path: ``AttentionStore.load`` it first).
        StoreError: the store holds no such relation. UnknownSiteError: no such site. SelectionError: ``query``,
            ``sample`` or ``calls`` not indices in range (it says the range).
    """
    require_store(store, "relation_map")
    maps = store.relation(relation, site)  # [call, sample, head, query, …]
    if isinstance(sample, Sample):
        sample = store.sample_index(sample)
    query, sample = (_index(name, value, size) for name, value, size in (
        ("query", query, maps.shape[3]), ("sample", sample, maps.shape[1])))
    n = maps.shape[0]
    if calls is None:
        chosen = list(range(n))
    elif isinstance(calls, slice):
        chosen = list(range(n))[calls]
    else:
        chosen = [calls] if _is_index(calls) else list(calls) if isinstance(calls, (list, tuple, range)) else None
    if not chosen or any(not _is_index(c) or not 0 <= operator.index(c) < n for c in chosen):
        raise SelectionError(f"calls={calls!r}: give indices on the call axis (an int, a list, range or slice of "
                             f"them), 0..{n - 1}")
    return maps[[operator.index(c) for c in chosen], sample, :, query].float().mean(dim=(0, 1))


def _is_index(value) -> bool:
    """An int (numpy's too), not a bool."""
    if isinstance(value, bool) or getattr(value, "dtype", None) == bool:
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _index(name: str, value, size: int) -> int:
    if not _is_index(value) or not 0 <= operator.index(value) < size:
        raise SelectionError(f"{name}={value!r} is not an index on the {name} axis, which has {size} (0..{size - 1})")
    return operator.index(value)
