"""DAAM 0.2.0's heat map from a store: ``heatmap(store, concept, method="daam")`` (see ``daam_map``).

Source: Tang et al. 2023, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention" (ACL), and its code,
castorini/daam release 0.2.0 (PyPI ``daam==0.2.0``): ``daam/hook.py`` (``UNetCrossAttentionLocator.locate``: which
sites), ``daam/trace.py`` (``UNetCrossAttentionHooker.__call__`` and ``_unravel_attn``: which rows, grids and calls
are recorded, summed over calls; ``DiffusionHeatMapHooker.compute_global_heat_map``: upsampling, clamp, mean),
``daam/heatmap.py`` (``RawHeatMapCollection.update``: the sum; ``GlobalHeatMap.compute_word_heat_map``: a word's
tokens; ``WordHeatMap.expand_as``: the image-size map) and ``daam/utils.py`` (``compute_token_merge_indices``).
The steps, in DAAM's order, are listed in ``daam_map``'s docstring. Read, not copied: this is our own code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..capture.sites import select_sites
from ..errors import ArgumentError, StoreError
from ..store import AttentionStore
from ..store.attention_store import require_store

__all__ = ["daam_map", "daam_sites", "DAAM_FACTORS", "DAAM_CONTEXT"]

#: the spatial factors DAAM 0.2.0 averages by default (``compute_global_heat_map(factors=None)``), less 8, which its
#: hooker never records ("skip if too large": at 512 px that is the 8×8 grid)
DAAM_FACTORS = frozenset({0, 1, 2, 4, 16, 32, 64})
#: DAAM's ``context_size``: a site is recorded only when its keys number this many (CLIP's 77 positions)
DAAM_CONTEXT = 77


def daam_sites(store: AttentionStore) -> list[str]:
    """The sites DAAM 0.2.0 hooks in a ``UNet2DConditionModel``, as store site names: every ``attn2`` of every
    transformer block of the ``up_blocks`` and ``down_blocks`` (``daam/hook.py``, ``UNetCrossAttentionLocator`` with
    ``locate_middle_block=False``: the mid block is hooked only to save or load heads), in the store's order.

    Raises:
        ArgumentTypeError: ``store`` is not an ``AttentionStore``.
    """
    require_store(store, "daam_sites")
    return [s.name for s in store.sites
            if s.name.split(".")[0] in ("up_blocks", "down_blocks") and s.name.endswith(".attn2")
            and ".attentions." in s.name and ".transformer_blocks." in s.name]


def _latent_hw(store: AttentionStore) -> int:
    """DAAM's ``latent_hw``: 4096 (64×64) when the UNet's ``sample_size`` × ``vae_scale_factor`` is 512 or 1024, else
    9216 (96×96), whatever size was generated (``trace.py``, ``DiffusionHeatMapHooker.__init__``)."""
    config = store.meta.get("denoiser_config") or {}
    sample_size = config.get("sample_size")
    image, latent = store.meta.get("image_size"), store.meta.get("latent_size")
    if not isinstance(sample_size, int) or not image or not latent or not latent[0]:
        raise StoreError(
            "method='daam' needs the UNet's sample_size (store.meta['denoiser_config']) and the VAE's scale "
            f"(image_size / latent_size in store.meta); this store has sample_size={sample_size!r}, "
            f"image_size={image!r}, latent_size={latent!r}")
    return 4096 if sample_size * (image[0] // latent[0]) in (512, 1024) else 9216


def _check_store(store: AttentionStore, idx: int, call_idx: list[int]) -> None:
    """Refuse what DAAM's map cannot be computed from exactly: say what is missing and what to capture."""
    meta, capture = store.meta, store.meta.get("capture") or {}
    if meta.get("denoiser") != "UNet2DConditionModel":
        raise StoreError(f"method='daam' reproduces DAAM 0.2.0, which hooks a UNet2DConditionModel's attn2 sites (SD "
                         f"1.x/2.x, SDXL); this store's denoiser is {meta.get('denoiser')!r}: use method='mean'")
    if capture.get("heads") == "mean":
        raise StoreError("method='daam' needs every head: DAAM upsamples and clamps each head's map before it "
                         "averages, but this store holds the head mean (probe(heads='mean')): capture with "
                         "heads='keep'")
    if store.samples[idx].pass_label != "cond":
        cond = [s.index for s in store.samples if s.pass_label == "cond"]
        raise StoreError(f"method='daam' reads the conditional rows, and sample {idx} is "
                         f"{store.samples[idx].pass_label!r}; the conditional samples are {cond}")
    entries = [store.calls[i] for i in call_idx] if not store.aggregate else store.calls
    for call in entries:
        if tuple(call.layout) != ("uncond", "cond"):
            raise StoreError(
                f"method='daam': denoiser call {call.index} has batch rows {list(call.layout)}; DAAM 0.2.0 keeps "
                "the second half of the batch × head rows, which is one image's conditional heads only for a batch "
                "[uncond, cond] (one prompt, one image, classifier-free guidance). For another batch (no guidance: "
                "half the heads of one row; several images: their heads pooled) its map is not one sample's; use "
                "method='mean' or generate one image with guidance_scale > 1")


def daam_map(store: AttentionStore, positions: list[int], idx: int, call_idx: list[int], sites=None,
             size=None, normalize: bool = False) -> torch.Tensor:
    """DAAM 0.2.0's word heat map from a store, step by step in DAAM's order.

    1. **Sites** (``hook.py``, ``UNetCrossAttentionLocator.locate``): the ``attn2`` of every transformer block of
       the up and down blocks; not the mid block. ``sites`` restricts them (DAAM's ``layer_idx`` / ``low_memory``).
    2. **Rows** (``trace.py``, ``_unravel_attn``): the second half of the ``batch × head`` rows; for a batch
       ``[uncond, cond]`` the conditional sample's heads (other batches are refused: see ``_check_store``).
    3. **Grids** (``trace.py``, ``__call__``): a site is recorded when it has 77 keys and its factor
       ``int(sqrt(latent_hw // (qh·qw)))`` is not 8; ``compute_global_heat_map`` then keeps the factors in
       ``{0, 1, 2, 4, 8, 16, 32, 64}``. ``latent_hw`` is 4096 when the UNet's ``sample_size × vae_scale_factor`` is
       512 or 1024, else 9216; so SD 1.5 at 512 px keeps the 64, 32 and 16 grids and skips the 8×8 one.
       Grids must be square (DAAM views them as ``sqrt(q) × sqrt(q)``).
    4. **Sum over calls** (``heatmap.py``, ``RawHeatMapCollection.update``): per (site, head), ``[token, qh, qw]``
       summed over every denoiser call of the pipeline call (``calls`` may choose fewer).
    5. **Upsample, clamp** (``compute_global_heat_map``): each (site, head) sum, each token's map alone, bicubic
       (``align_corners=False``) to ``x × x``, ``x = sqrt(latent_hw)`` (64 or 96, not the image size), then
       clamped at 0 (bicubic undershoots).
    6. **Mean over every (site, head) entry** (``maps.mean(0)``): every head of every kept site weighs the same.
       DAAM's ``normalize=False`` default: no division by the token sum.
    7. **The word** (``GlobalHeatMap.compute_word_heat_map``, ``utils.compute_token_merge_indices``): the mean of
       its tokens' maps over every occurrence in the prompt (``positions``).
    8. **Image size, optional** (``WordHeatMap.expand_as``): with ``size``, bicubic to ``size``; with
       ``normalize``, min-max scaled, ``(m - min) / (max - min + 1e-8)`` (``expand_as(absolute=False)``).

    Args:
        positions: the word's token positions on the store's ``token`` axis. idx: the sample.
        call_idx: positions on the ``call`` axis to sum (for an aggregate store, its one entry).
        sites: site selector within DAAM's sites. size: ``(H, W)`` or ``None`` (DAAM's ``x × x``).
        normalize: min-max scale as ``expand_as`` does.

    Returns:
        float32 ``[x, x]`` (or ``size``): attention probability summed over calls (units: calls × probability),
        averaged over sites, heads and the word's tokens; in ``[0, 1]`` with ``normalize``.

    Raises:
        StoreError: not a UNet2DConditionModel; head-mean store; not a conditional sample; a batch other than
            ``[uncond, cond]``; a DAAM site missing from the store; no grid DAAM keeps.
        ArgumentError: a ``sites`` choice outside DAAM's sites.
    """
    _check_store(store, idx, call_idx)
    hooked = daam_sites(store)
    if sites is None:
        missing = [n for n in _all_daam_names(store) if n not in hooked]
        chosen = hooked
        if missing:
            raise StoreError(f"method='daam' averages every site DAAM hooks, and this store lacks {len(missing)} of "
                             f"them (e.g. {missing[:2]}): capture with sites=None, or pass sites= to choose")
    else:
        chosen = [s.name for s in select_sites(store.sites, sites)]
        outside = [n for n in chosen if n not in hooked]
        if outside:
            raise ArgumentError(f"sites {outside[:3]} are not sites DAAM 0.2.0 hooks (the attn2 of the up and down "
                                f"blocks, not the mid block); DAAM's sites in this store: {hooked[:4]}…")
    latent_hw = _latent_hw(store)
    side = math.isqrt(latent_hw)
    n_keys = len(store.layout(idx).strings)
    scale = len(store.calls) if store.aggregate == "mean" else 1  # a mean over calls × their number: the sum
    merged = []
    for name in chosen:
        maps = store.maps(name, calls=call_idx, samples=[idx], tokens=positions)  # [call, 1, head, qh, qw, token]
        qh, qw = maps.shape[3], maps.shape[4]
        if n_keys != DAAM_CONTEXT or name in store.flat_sites:
            continue  # DAAM records only 77 keys, and views every map as a square grid
        if int(math.sqrt(latent_hw // (qh * qw))) not in DAAM_FACTORS:
            continue
        if qh != qw:
            raise StoreError(f"site {name} has a {qh}×{qw} grid: DAAM 0.2.0 views every map as a square "
                             "sqrt(q) × sqrt(q) grid and fails on other sizes; generate a square image")
        summed = maps[:, 0].double().sum(0).float() * scale  # [head, qh, qw, token], DAAM's sum over calls
        per_head = summed.permute(0, 3, 1, 2).reshape(-1, 1, qh, qw)  # every (head, token) map on its own
        up = F.interpolate(per_head, size=(side, side), mode="bicubic", align_corners=False).clamp_(min=0)
        merged.append(up.reshape(summed.shape[0], len(positions), side, side))
    if not merged:
        raise StoreError(
            f"no site DAAM 0.2.0 keeps: it records sites with {DAAM_CONTEXT} keys (this prompt has {n_keys}) whose "
            f"factor int(sqrt({latent_hw} // (qh·qw))) is in {sorted(DAAM_FACTORS)}; DAAM itself would raise 'No heat "
            "maps found' (generate at the UNet's native size: 512 px for SD 1.x)")
    entries = torch.cat(merged, dim=0)  # [site·head, token, x, x]
    word = entries.mean(dim=0).mean(dim=0)  # the mean over every entry, then over the word's tokens
    if size is not None:
        word = F.interpolate(word[None, None], size=tuple(size), mode="bicubic", align_corners=False)[0, 0]
    if normalize:
        word = (word - word.min()) / (word.max() - word.min() + 1e-8)
    return word


def _all_daam_names(store: AttentionStore) -> list[str]:
    """Every site DAAM would hook in this store's UNet (also those the probe was not asked for), from its config:
    down block ``b`` has ``layers_per_block[b]`` attentions, up block ``b`` one more (diffusers' UNet2DConditionModel),
    each of ``transformer_layers_per_block`` transformer blocks (reversed, or ``reverse_transformer_layers_per_block``,
    for the up blocks)."""
    config = store.meta.get("denoiser_config") or {}
    down, up = list(config.get("down_block_types") or ()), list(config.get("up_block_types") or ())
    layers = _per_block(config.get("layers_per_block", 2), len(down))
    depth = _per_block(config.get("transformer_layers_per_block", 1), len(down))
    up_depth = config.get("reverse_transformer_layers_per_block") or depth[::-1]
    names = []
    for group, kinds, n_attn, depths in (("down_blocks", down, layers, depth),
                                         ("up_blocks", up, [n + 1 for n in layers[::-1]], up_depth)):
        for b, kind in enumerate(kinds):
            if "CrossAttn" in kind:
                names += [f"{group}.{b}.attentions.{a}.transformer_blocks.{t}.attn2" for a in range(n_attn[b])
                          for t in range(_per_block(depths[b], n_attn[b])[a])]
    return names


def _per_block(value, n: int) -> list:
    """A config value given once or per block (per attention, when nested), as a list of ``n``."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n
