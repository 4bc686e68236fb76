"""Stores with known answers, for analysis tests and examples (no pipeline is run).

    >>> store = synthetic_store(calls=3, prompt="a picture of dog", mass={"dog": [0.5, 0.25, 0.0]})
    >>> store[store.sites[0].name][:, 0, 0, 0, 0, 4].tolist()     # dog is position 4
    [0.5, 0.25, 0.0]
"""

from __future__ import annotations

import torch

from ..store import AttentionStore, Call, Sample, Site
from ..text.tokens import find_concept, token_layout
from .tokenizers import clip_tokenizer

__all__ = ["synthetic_store", "synthetic_video_store"]


def synthetic_store(
    calls: int = 2,
    prompt: str = "a picture of dog",
    grid: tuple[int, int] = (2, 2),
    heads: int = 2,
    sites: int = 1,
    mass: dict[str, list[float]] | None = None,
    spot: dict[str, tuple[int, int]] | None = None,
):
    """A store with known maps, for analysis tests: one conditional sample, 77 CLIP positions.

    Args:
        calls: number of denoiser calls. prompt: the sample's prompt. grid: ``(qh, qw)``. heads, sites: counts.
        mass: per concept, the probability its tokens get at every position, per call (split evenly between
            its positions); the rest goes to the start token. Default: uniform over the 77 positions.
        spot: per concept, one ``(qh, qw)`` position that puts all its mass there instead (for heat maps).

    Returns:
        An ``AttentionStore`` whose ``trajectory`` for each ``mass`` concept equals the given list.
    """
    layout = token_layout(clip_tokenizer(), prompt, 77)
    qh, qw = grid
    maps = torch.full((calls, 1, heads, qh, qw, 77), 1 / 77, dtype=torch.float32)
    if mass:
        maps.zero_()
        maps[..., 0] = 1.0
        for concept, per_call in mass.items():
            pos = sorted({p for occ in find_concept(layout, concept) for p in occ})
            for c, m in enumerate(per_call):
                where = (slice(None),) * 2
                if spot and concept in spot:
                    y, x = spot[concept]
                    share = m * qh * qw
                    maps[c, :, :, y, x, pos] += share / len(pos)
                    maps[c, :, :, y, x, 0] -= share
                else:
                    maps[c][where + (slice(None), slice(None), pos)] += m / len(pos)
                    maps[c, ..., 0] -= m
    site_list = [
        Site(f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2", "cross", heads, 8, "down", f"down_blocks.{i}", i)
        for i in range(sites)
    ]
    store = AttentionStore(
        site_list,
        [Call(i, float(999 - i * 999 // max(calls - 1, 1)), 0, ("cond",)) for i in range(calls)],
        [Sample(0, "cond", 0, 0, 0, prompt)],
        [layout],
        {s.name: maps.clone() for s in site_list},
        {"pipeline": "Synthetic", "denoiser": "Synthetic", "image_size": list(grid), "prompts": [prompt]},
    )
    return store


def synthetic_video_store(
    calls: int = 2,
    frames: int = 3,
    prompt: str = "a picture of dog",
    grid: tuple[int, int] = (2, 2),
    heads: int = 2,
    frame_mass: dict[str, list[float]] | None = None,
    temporal_compression: int = 4,
):
    """A video store with known maps, for analysis tests: one conditional sample, 77 CLIP positions, one site,
    ``[call, sample, head, qt, qh, qw, token]`` with ``qt = frames`` latent frames of patch ``(1, 1, 1)``.

    Args:
        calls, prompt, heads: as for ``synthetic_store``. frames: latent frames (``qt``). grid: ``(qh, qw)``.
        frame_mass: per concept, the probability its tokens get at every position of each latent frame, the same at
            every call (split evenly between its positions); the rest goes to the start token. Default: uniform.
        temporal_compression: decoded frames per latent frame after the first (``meta["video"]``). Default: 4.

    Returns:
        An ``AttentionStore`` whose ``trajectory(by_frame=True)`` for each ``frame_mass`` concept is the given list at
        every call.
    """
    layout = token_layout(clip_tokenizer(), prompt, 77)
    qh, qw = grid
    maps = torch.full((calls, 1, heads, frames, qh, qw, 77), 1 / 77, dtype=torch.float32)
    if frame_mass:
        maps.zero_()
        maps[..., 0] = 1.0
        for concept, per_frame in frame_mass.items():
            pos = sorted({p for occ in find_concept(layout, concept) for p in occ})
            for f, m in enumerate(per_frame):
                maps[:, :, :, f, :, :, pos] += m / len(pos)
                maps[:, :, :, f, :, :, 0] -= m
    site = Site("blocks.0.attn2", "cross", heads, 8, "blocks", "blocks.0", 0)
    video = {"qt": frames, "latent_frames": frames, "patch": [1, 1, 1], "temporal_compression": temporal_compression,
             "first_frame_alone": True, "frames": (frames - 1) * temporal_compression + 1}
    return AttentionStore(
        [site], [Call(i, float(999 - i * 999 // max(calls - 1, 1)), 0, ("cond",)) for i in range(calls)],
        [Sample(0, "cond", 0, 0, 0, prompt)], [layout], {site.name: maps},
        {"pipeline": "Synthetic", "denoiser": "Synthetic", "image_size": list(grid), "prompts": [prompt], "video": video},
    )
