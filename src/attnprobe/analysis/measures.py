"""Pure functions over stores: concept-token attention trajectories, their area, comparisons, heat maps.

    >>> from attnprobe.testing import synthetic_store
    >>> store = synthetic_store(calls=3, prompt="a picture of dog", mass={"dog": [0.5, 0.25, 0.0]})
    >>> trajectory(store, "dog").tolist()
    [0.5, 0.25, 0.0]
    >>> auc(trajectory(store, "dog"))
    0.25

Measures:

- **Concept mass** of a site at a call: the attention probability on the concept's token positions, summed
  over those positions (all occurrences, or one), averaged over heads and image positions. In ``[0, 1]``;
  1 means every image position attends only to the concept. (Prompt-to-Prompt and DAAM read the same
  per-token maps; the averaging here weighs every image position and head equally.)
- **Trajectory**: the concept mass per denoiser call, averaged over sites (every site weighs the same).
- **Video stores** (``[call, sample, head, qt, qh, qw, token]``): the concept mass averages over every video position
  (``qt × qh × qw``, each latent frame weighing the same), the same number as an image's mean over ``qh × qw``;
  ``trajectory(by_frame=True)`` keeps the ``qt`` axis and ``heatmap(frame=...)`` draws one latent frame or all.
- **AUC**: the trapezoidal area under a trajectory over denoising progress ``x = call / (calls - 1)`` in
  ``[0, 1]``, so a flat trajectory at ``m`` has AUC ``m`` (units: attention mass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..capture.sites import select_sites
from ..errors import ArgumentError, ArgumentTypeError, SelectionError, StoreError
from ..store import AttentionStore
from ..store.attention_store import require_store
from ..store.axes import as_index, positions as axis_positions
from .daam import daam_map

#: the largest heat-map side heatmap() makes (pixels): a larger size is a mistake, not a request
MAX_SIDE = 16384

__all__ = ["trajectory", "auc", "compare", "heatmap", "Comparison", "concept_positions", "check_comparable", "require_store",
           "require_per_call", "generation_calls", "MAX_SIDE", "HEATMAP_METHODS"]

#: heatmap()'s aggregations: attnprobe's mean (the default) and DAAM 0.2.0's (``analysis.daam``)
HEATMAP_METHODS = ("mean", "daam")


def concept_positions(store: AttentionStore, concept: str, sample: int = 0, occurrence="all") -> list[int]:
    """Token positions of ``concept`` in a sample: every occurrence (``"all"``), or one (an int; negative
    counts from the end, so ``-1`` is the last mention).

    Raises:
        ArgumentTypeError: ``store`` is not an ``AttentionStore`` (a path: ``AttentionStore.load`` it first).
        ConceptError: see ``AttentionStore.token_indices``.
        SelectionError: no such occurrence (says how many there are; an ``IndexError`` too).
    """
    require_store(store, "concept_positions")
    found = store.token_indices(sample, concept)
    if occurrence == "all":
        return sorted({p for occ in found for p in occ})
    index = as_index(occurrence)
    if index is None or not -len(found) <= index < len(found):
        times = "once" if len(found) == 1 else f"{len(found)} times"
        raise SelectionError(f"occurrence {occurrence!r} of {concept!r}: sample {sample} mentions it {times} "
                             f"(occurrences 0..{len(found) - 1}, or -1 for the last)")
    return list(found[index])


def _site_mass(store: AttentionStore, site: str, sample: int, positions: list[int], calls=None,
               by_frame: bool = False) -> torch.Tensor:
    # [call, 1, head, qh, qw, len(positions)] → [call]; reads only these tokens from a streamed store
    picked = store.maps(site, calls=calls, samples=[sample], tokens=positions).float().sum(dim=-1)
    if picked.ndim == 5:
        return picked.mean(dim=(1, 2, 3, 4))
    # a video store's [call, 1, head, qt, qh, qw] → [call, qt] or, pooled over every video position, [call]
    return picked.mean(dim=(1, 2, 4, 5)) if by_frame else picked.mean(dim=(1, 2, 3, 4, 5))


def require_video(store: AttentionStore, what: str) -> dict:
    """A video store's frame record (``store.video``).

    Raises:
        ArgumentTypeError: ``store`` is not an ``AttentionStore``.
        StoreError: an image store (no ``qt`` axis); says what was asked.
    """
    require_store(store, what)
    video = store.video
    if video is None:
        raise StoreError(f"{what} needs a video store ([call, sample, head, qt, qh, qw, token]), but this store's "
                         f"maps are an image's ({store.meta.get('denoiser')}: [call, sample, head, qh, qw, token])")
    return video


def require_per_call(store: AttentionStore, what: str) -> None:
    """Raise ``StoreError`` when ``store`` holds an aggregate over calls (``probe(aggregate=...)``), not a map per call."""
    if store.aggregate:
        raise StoreError(
            f"{what} needs a map per denoiser call, but this store holds the {store.aggregate} over its "
            f"{len(store.calls)} calls (probe(aggregate={store.aggregate!r})): capture without aggregate= for "
            "trajectories; heatmap() works on it"
        )


def generation_calls(store: AttentionStore, generation, what: str) -> list[int] | None:
    """Positions on the ``call`` axis of one pipeline call (``Call.generation``), or ``None`` for all of them.

    A store that holds several pipeline calls (a probe around two generations) has no single run to join them into:
    without ``generation`` it is refused.

    Raises:
        StoreError: ``generation`` is ``None`` and the store's calls come from several pipeline calls.
        SelectionError: no call of that generation (lists the generations).
    """
    gens = sorted({c.generation for c in store.calls})
    if generation is None:
        if len(gens) > 1:
            counts = ", ".join(f"generation {g}: {sum(c.generation == g for c in store.calls)} calls" for g in gens)
            raise StoreError(
                f"{what}: this store holds {len(gens)} pipeline calls ({counts}); joining them would make one run of "
                f"{len(store.calls)} calls (and auc would integrate across them): pass generation= one of {gens}")
        return None
    g = as_index(generation)
    if g is None or g not in gens:
        raise SelectionError(f"generation={generation!r}: this store's calls come from generations {gens} "
                             "(Call.generation, 0 for the probe's first pipeline call)")
    return [i for i, c in enumerate(store.calls) if c.generation == g]


def trajectory(
    store: AttentionStore,
    concept: str,
    sample: int = 0,
    *,
    occurrence="all",
    by_site: bool = False,
    sites=None,
    generation: int | None = None,
    by_frame: bool = False,
) -> torch.Tensor:
    """Attention mass on a concept's tokens per denoiser call of one pipeline call.

    Args:
        store: the capture.
        concept: word or phrase of the sample's prompt (``"van gogh"``).
        sample: index on the store's ``sample`` axis. Default: 0.
        occurrence: ``"all"`` (sum over every mention) or an int (one mention; ``-1`` is the last).
        by_site: return ``[call, site]`` instead of the site mean. Default: False.
        sites: site selector (names, globs, predicate) within the store. Default: all.
        generation: which pipeline call (``Call.generation``: 0 for the probe's first) when the store holds
            several. Default: ``None``, the only one (a store of several is refused).
        by_frame: a video store: keep its ``qt`` axis (latent frames at the sites' resolution), the mass of each
            frame's positions. Default: False (the mean over every video position: each frame weighs the same, so the
            pooled value is the mean of the per-frame ones).

    Returns:
        float32 ``[call]`` (mean over sites) or ``[call, site]`` (sites in ``store.sites`` order), the calls of one
        pipeline call; with ``by_frame``, ``[call, qt]`` or ``[call, site, qt]``. Values in ``[0, 1]``: the share of
        attention on the concept's tokens.

    Raises:
        ArgumentTypeError: ``store`` is not an ``AttentionStore`` (a path: ``AttentionStore.load`` it first).
        ConceptError: concept not in the sample's prompt, or truncated.
        StoreError: an aggregate store; a store of several pipeline calls without ``generation`` (names them);
            ``by_frame`` on an image store.
        SelectionError: no such generation.

    Examples:
        >>> from attnprobe.testing import synthetic_video_store
        >>> store = synthetic_video_store(calls=2, frames=3, prompt="a dog", frame_mass={"dog": [0.1, 0.2, 0.6]})
        >>> [round(v, 6) for v in trajectory(store, "dog", by_frame=True)[0].tolist()]
        [0.1, 0.2, 0.6]
        >>> round(float(trajectory(store, "dog")[0]), 6)      # pooled: every frame weighs the same
        0.3
    """
    require_store(store, "trajectory")
    require_per_call(store, "trajectory")
    if by_frame:
        require_video(store, "trajectory(by_frame=True)")
    calls = generation_calls(store, generation, "trajectory")
    positions = concept_positions(store, concept, sample, occurrence)
    idx = store.sample_index(sample)
    chosen = select_sites(store.sites, sites)
    per_site = torch.stack([_site_mass(store, s.name, idx, positions, calls, by_frame) for s in chosen], dim=1)
    return per_site if by_site else per_site.mean(dim=1)


def _frames(store: AttentionStore, frame, method: str) -> list[int] | None:
    """The positions on a video store's ``qt`` axis that ``heatmap(frame=...)`` draws (every one for ``None`` and
    ``"all"``), or ``None`` for an image store (which takes ``frame=None`` only).

    Raises:
        StoreError: ``frame`` on an image store; a video store with ``method="daam"``. ArgumentError: not an int,
            ``"all"`` or ``None``. SelectionError: out of range."""
    video = store.video
    if video is None:
        if frame is not None:
            require_video(store, f"heatmap(frame={frame!r})")
        return None
    if method != "mean":
        raise StoreError(f"heatmap(method={method!r}) reproduces DAAM's image maps; a video store takes method='mean'")
    if frame is None or (isinstance(frame, str) and frame == "all"):
        return list(range(video["qt"]))
    if as_index(frame) is None:
        raise ArgumentError(f"frame={frame!r}: give a latent frame (an int on the qt axis, 0..{video['qt'] - 1}), "
                            "'all' or None (the mean over frames)")
    return axis_positions("frame", frame, video["qt"])


def auc(traj: torch.Tensor, x: Sequence[float] | torch.Tensor | None = None) -> float | torch.Tensor:
    """Area under a trajectory (trapezoid rule) over denoising progress.

    The trajectory is one pipeline call's (``trajectory`` refuses to join the calls of a store holding several unless
    told which: ``generation=``), so the area never runs across two generations.

    Args:
        traj: ``[call]`` or ``[call, site]``.
        x: abscissa per call; default ``linspace(0, 1, calls)`` (progress through the denoising).

    Returns:
        A float for ``[call]``, a ``[site]`` tensor for ``[call, site]``. With one call: its value.
    """
    if isinstance(traj, AttentionStore):
        raise ArgumentTypeError("auc takes a trajectory ([call] or [call, site]), not a store: auc(trajectory(store, concept))")
    traj = torch.as_tensor(traj, dtype=torch.float64)
    if traj.ndim not in (1, 2):
        raise ArgumentError(f"auc takes a [call] or [call, site] trajectory; got shape {tuple(traj.shape)}")
    n = traj.shape[0]
    if n == 0:
        raise ArgumentError("auc of an empty trajectory")
    if n == 1:
        out = traj[0]
    else:
        xs = torch.linspace(0, 1, n, dtype=torch.float64) if x is None else torch.as_tensor(x, dtype=torch.float64)
        if xs.shape[0] != n:
            raise ArgumentError(f"x has {xs.shape[0]} values for a trajectory of {n} calls")
        out = torch.trapezoid(traj, xs, dim=0)
    return float(out) if out.ndim == 0 else out.float()


@dataclass
class Comparison:
    """What ``compare`` returns (every trajectory ``[call]``, float32).

    Attributes:
        base, other: trajectories summed over every mention of the concept.
        delta: ``other - base``; delta_auc: ``auc(other) - auc(base)``.
        base_aligned, other_aligned: the mentions paired by occurrence (see ``align``), one trajectory each.
        delta_aligned: ``other_aligned - base_aligned``; delta_auc_aligned: its AUC.
        pairs: the (base occurrence, other occurrence) indices that were paired.
    """

    base: torch.Tensor
    other: torch.Tensor
    delta: torch.Tensor
    delta_auc: float
    base_aligned: torch.Tensor
    other_aligned: torch.Tensor
    delta_aligned: torch.Tensor
    delta_auc_aligned: float
    pairs: list[tuple[int, int]]


def check_comparable(base: AttentionStore, other: AttentionStore, calls=(None, None)) -> None:
    """Raise ``StoreError`` unless two stores come from the same pipeline and denoiser (class and config),
    sites, timesteps (so calls pair at the same noise level) and latent size.

    ``calls``: the positions on each store's ``call`` axis to pair (``generation_calls``); ``None``: all.

    Raises:
        ArgumentTypeError: either is not an ``AttentionStore``. StoreError: they cannot be compared."""
    for name, value in (("base", base), ("other", other)):
        require_store(value, "compare", name)
    problems = []
    for key in ("denoiser", "pipeline"):
        if base.meta.get(key) != other.meta.get(key):
            problems.append(f"{key}: {base.meta.get(key)} vs {other.meta.get(key)}")
    if base.meta.get("denoiser_config") != other.meta.get("denoiser_config"):
        problems.append("denoiser configs differ")
    if base.site_names != other.site_names:
        problems.append(f"sites: {len(base.sites)} vs {len(other.sites)} ({sorted(set(base.site_names) ^ set(other.site_names))[:3]} differ)")
    paired = [s.calls if pick is None else [s.calls[i] for i in pick] for s, pick in zip((base, other), calls)]
    if len(paired[0]) != len(paired[1]):
        problems.append(f"calls: {len(paired[0])} vs {len(paired[1])}")
    elif [c.timestep for c in paired[0]] != [c.timestep for c in paired[1]]:
        problems.append(
            f"timesteps differ (scheduler {base.meta.get('scheduler')} vs {other.meta.get('scheduler')}): calls "
            "would be paired at different noise levels"
        )
    if base.meta.get("latent_size") != other.meta.get("latent_size"):
        problems.append(f"latent sizes: {base.meta.get('latent_size')} vs {other.meta.get('latent_size')}")
    joint = [(s.meta.get("capture") or {}).get("joint") for s in (base, other)]
    if joint[0] != joint[1]:
        problems.append(f"joint maps: {joint[0]!r} vs {joint[1]!r} (exact rows sum to the text share, renorm rows to 1)")
    if problems:
        raise StoreError("the stores cannot be compared: " + "; ".join(problems))


def compare(
    base: AttentionStore,
    other: AttentionStore,
    concept: str,
    *,
    sample: int = 0,
    other_sample: int | None = None,
    align: str = "last",
    sites=None,
    generation: int | None = None,
    other_generation: int | None = None,
) -> Comparison:
    """Δ concept trajectory and Δ AUC between two captures of the same pipeline (e.g. baseline vs instruction).

    Mentions are aligned by occurrence: ``align="last"`` pairs them counting from the end (the baseline's
    only "…a picture of dog" with the instruction's last "…generate a picture of dog"), ``"first"`` from the
    start; unpaired mentions count only in the all-mentions trajectories.

    Args:
        base: the reference store (e.g. the baseline prompt's).
        other: a store from the same pipeline, sites, timesteps and size (e.g. the instruction's).
        concept: word or phrase present in both prompts.
        sample: sample index in ``base``.
        other_sample: sample index in ``other``. Default: ``sample``.
        align: ``"last"`` or ``"first"``. Default ``"last"``.
        sites: site selector applied to both. Default: all.
        generation: the pipeline call of ``base`` when it holds several (see ``trajectory``). Default: ``None``.
        other_generation: the same for ``other``. Default: ``generation``.

    Raises:
        StoreError: the stores come from different pipelines/denoisers, sites, timesteps or sizes; a store of
            several pipeline calls without ``generation``.
        ArgumentTypeError: ``base`` or ``other`` is not an ``AttentionStore`` (e.g. a path: load it first).
        ConceptError: the concept is missing from either prompt.
    """
    if align not in ("last", "first"):
        raise ArgumentError(f"align={align!r} is not 'last' or 'first'")
    other_generation = generation if other_generation is None else other_generation
    if not all(isinstance(s, AttentionStore) for s in (base, other)):
        check_comparable(base, other)  # says which is not a store
    picked = (generation_calls(base, generation, "compare (base)"),
              generation_calls(other, other_generation, "compare (other)"))
    check_comparable(base, other, picked)
    other_sample = sample if other_sample is None else other_sample
    mine, theirs = {"sites": sites, "generation": generation}, {"sites": sites, "generation": other_generation}
    t_base = trajectory(base, concept, sample, **mine)
    t_other = trajectory(other, concept, other_sample, **theirs)
    n_base = len(base.token_indices(sample, concept))
    n_other = len(other.token_indices(other_sample, concept))
    k = min(n_base, n_other)
    pairs = [(n_base - k + i, n_other - k + i) if align == "last" else (i, i) for i in range(k)]
    base_al = sum(trajectory(base, concept, sample, occurrence=i, **mine) for i, _ in pairs)
    other_al = sum(trajectory(other, concept, other_sample, occurrence=j, **theirs) for _, j in pairs)
    delta, delta_al = t_other - t_base, other_al - base_al
    return Comparison(
        base=t_base,
        other=t_other,
        delta=delta,
        delta_auc=auc(t_other) - auc(t_base),
        base_aligned=base_al,
        other_aligned=other_al,
        delta_aligned=delta_al,
        delta_auc_aligned=auc(other_al) - auc(base_al),
        pairs=pairs,
    )


def heatmap(
    store: AttentionStore,
    concept: str,
    sample: int = 0,
    *,
    calls=None,
    sites=None,
    occurrence="all",
    size: tuple[int, int] | None = None,
    normalize: bool = False,
    method: str = "mean",
    generation: int | None = None,
    frame=None,
) -> torch.Tensor:
    """A concept's attention over the image, ``[H, W]`` float32 (a video store's, ``frame="all"``: ``[qt, H, W]``).

    ``method="mean"`` (the default, attnprobe's): for each chosen site and call, the maps of the concept's tokens are
    summed over those tokens and averaged over heads, giving ``[qh, qw]``; each is resized to ``size`` (bilinear);
    the result is the mean over sites and calls. DAAM-like (Tang et al. 2023, "What the DAAM: Interpreting Stable
    Diffusion Using Cross Attention"), not DAAM's: DAAM sums over calls, upsamples and clamps each head bicubically,
    averages the word's tokens and skips grids. ``normalize=True`` divides by the maximum.

    ``method="daam"``: DAAM 0.2.0's map exactly, in its order (castorini/daam ``trace.py``, ``heatmap.py``,
    ``hook.py``; the steps in ``attnprobe.analysis.daam.daam_map``): the conditional sample's every head of the
    ``attn2`` sites of the up and down blocks, each summed over the pipeline call's denoiser calls, upsampled bicubically
    to DAAM's ``x × x`` (64 when the UNet's native size is 512 or 1024 px, else 96) and clamped at 0, averaged over
    every (site, head) entry, then over the word's tokens; grids DAAM skips (its factor 8, e.g. SD 1.5's 8×8) are
    skipped. It equals ``trace.compute_global_heat_map().compute_word_heat_map(word).heatmap`` to float precision
    for a store probed with ``dtype=torch.float32`` (DAAM sums in the pipeline's dtype). ``size``: then bicubic to
    ``size`` (``WordHeatMap.expand_as``); ``normalize=True``: min-max scaled as ``expand_as`` does. It refuses what
    it cannot reproduce exactly: a denoiser other than ``UNet2DConditionModel``, a head-mean store
    (``heads="mean"``), an unconditional sample, a batch other than ``[uncond, cond]`` (no guidance, several images
    or prompts), a store lacking some of DAAM's sites, no grid DAAM keeps.

    Args:
        store: the capture.
        concept: word or phrase of the sample's prompt.
        sample: index on the ``sample`` axis. Default: 0.
        occurrence: ``"all"`` or one mention's index (``-1``: the last). DAAM's own map is ``"all"``.
        calls: call indices (an int, a slice or a list), within ``generation``. Default: every call (for a store
            captured with ``aggregate=``, its one aggregate). An empty or out-of-range choice raises ``SelectionError`` (an ``IndexError``).
        sites: site selector (with ``"daam"``: within DAAM's sites, as its ``layer_idx``). Default: every site (flat
            sites are skipped: they have no grid).
        size: output ``(H, W)`` or one int for both (1 to ``MAX_SIDE``, 16384). Default: the image size in pixels recorded in the store's metadata, else
            the largest site grid; with ``"daam"``, DAAM's ``x × x``.
        normalize: ``"mean"``: divide by the maximum so that values lie in ``[0, 1]``; ``"daam"``: min-max scale.
            Default: False (units: attention probability on the concept, averaged over calls for ``"mean"``, summed
            over calls for ``"daam"``).
        method: ``"mean"`` or ``"daam"``. Default: ``"mean"``.
        generation: which pipeline call when the store holds several (``Call.generation``). Default: ``None``, every
            call (``"daam"``, which is one pipeline call's map, refuses a store of several without it).
        frame: a video store's latent frame on its ``qt`` axis (an int; negative counts from the end), ``"all"``
            (``[qt, H, W]``, every frame, one scale), or ``None``: the mean over frames (each weighs the same).
            ``normalize`` divides by the maximum of what is returned. Default: ``None``.

    Raises:
        ArgumentTypeError: ``store`` is not an ``AttentionStore``.
        ConceptError: see ``trajectory``. StoreError: no site with a spatial grid was chosen; ``"daam"``: what it
            cannot reproduce (above); ``frame`` on an image store. ArgumentError: a bad ``size``, ``normalize``,
            ``method`` or ``frame``. SelectionError: a frame out of range (says the ``qt`` length).
    """
    require_store(store, "heatmap")
    if method not in HEATMAP_METHODS:
        raise ArgumentError(f"method={method!r}: give one of {list(HEATMAP_METHODS)}")
    frames = _frames(store, frame, method)
    positions = concept_positions(store, concept, sample, occurrence)
    idx = store.sample_index(sample)
    chosen = [s for s in select_sites(store.sites, sites) if s.name not in store.flat_sites]
    if not chosen:
        raise StoreError("no chosen site has a spatial grid (all are flat)")
    if size is None and method == "mean":
        size = tuple(store.meta.get("image_size") or ()) or max(tuple(store[s.name].shape[-3:-1]) for s in chosen)
    given = size
    if size is not None:
        size = (size, size) if as_index(size) is not None else tuple(size) if isinstance(size, (tuple, list)) else ()
        size = tuple(as_index(v) for v in size)
        if len(size) != 2 or not all(v is not None and 1 <= v <= MAX_SIDE for v in size):
            raise ArgumentError(f"size={given!r} is not a positive int or a (height, width) pair of positive ints, "
                                f"each at most {MAX_SIDE}")
    if not isinstance(normalize, bool):
        raise ArgumentError(f"normalize={normalize!r}: give True or False")
    if store.aggregate:
        if generation is not None or (method == "daam" and len({c.generation for c in store.calls}) > 1):
            raise StoreError(f"this store holds the {store.aggregate} over {len(store.calls)} calls of generations "
                             f"{sorted({c.generation for c in store.calls})} as one map: it cannot be split by "
                             "generation; capture one pipeline call, or without aggregate=")
        within = None
    else:
        picks = method == "daam" or generation is not None  # DAAM's map is one pipeline call's
        within = generation_calls(store, generation, f"heatmap(method={method!r})") if picks else None
    n_calls = 1 if store.aggregate else len(store.calls) if within is None else len(within)
    call_idx = list(range(n_calls)) if calls is None else axis_positions("call", calls, n_calls)
    if not call_idx:
        raise SelectionError(f"calls={calls!r} picks no call; the store has calls 0..{n_calls - 1}")
    if within is not None:
        call_idx = [within[i] for i in call_idx]
    if method == "daam":
        return daam_map(store, positions, idx, call_idx, sites=sites, size=size, normalize=normalize)

    total = torch.zeros(size if frames is None else (len(frames), *size), dtype=torch.float32)
    for s in chosen:
        maps = store.maps(s.name, calls=call_idx, samples=[idx], tokens=positions).float().sum(-1)  # [call, 1, head, qh, qw]
        if frames is None:
            grid = maps.mean(dim=(0, 1, 2))[None, None]
            total += torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]
        else:  # a video store's [call, 1, head, qt, qh, qw]: one [qh, qw] map per chosen frame
            grid = maps.mean(dim=(0, 1, 2))[frames][:, None]
            total += torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]
    total /= len(chosen)
    if frames is not None and frame is None:
        total = total.mean(0)  # every frame weighs the same
    elif frames is not None and frame != "all":
        total = total[0]
    if normalize and total.max() > 0:
        total = total / total.max()
    return total
