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

import torch

from ..errors import SelectionError
from ..store import AttentionStore

__all__ = ["relation_map"]


def relation_map(store: AttentionStore, relation: str, site, query: int = 0, sample: int = 0, calls=None) -> torch.Tensor:
    """One query's relation map, averaged over denoiser calls and heads, in float32.

    Args:
        store: a store recorded with ``probe(relations=...)``.
        relation: ``"image->image"``, ``"text->image"`` or ``"text->text"``.
        site: a probed site (name or ``Site``) or the module the relation was read at.
        query: the index on the query axis: a point of ``store.meta["relations"]["points"]`` (``image->image``) or a
            kept text position's index on the ``token`` axis (``store.token_positions``). Default 0.
        sample: a store sample index. Default 0.
        calls: indices on the ``call`` axis to average (a list or ``range``); ``None``: every call.

    Returns:
        ``[kh, kw]`` (``image->image``, ``text->image``: over the site's image grid) or ``[key]`` (``text->text``: over
        every text key): the mean over the chosen calls and the heads of the query's attention; it sums to 1 for
        self-attention and ``joint="renorm"``, to the block's share of the softmax for ``joint="exact"``.

    Raises:
        StoreError: the store holds no such relation. UnknownSiteError: no such site. SelectionError: ``query``,
            ``sample`` or ``calls`` out of range (it says the range).
    """
    maps = store.relation(relation, site)  # [call, sample, head, query, …]
    for name, value, size in (("query", query, maps.shape[3]), ("sample", sample, maps.shape[1])):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < size:
            raise SelectionError(f"{name}={value!r} is not an index of the {size} on the {name} axis (0..{size - 1})")
    chosen = list(range(maps.shape[0])) if calls is None else list(calls)
    if not chosen or any(not isinstance(c, int) or not 0 <= c < maps.shape[0] for c in chosen):
        raise SelectionError(f"calls={calls!r}: give indices on the call axis, 0..{maps.shape[0] - 1}")
    return maps[chosen, sample, :, query].float().mean(dim=(0, 1))
