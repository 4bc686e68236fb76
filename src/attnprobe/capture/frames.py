"""The frame axis of video denoisers: each site's query grid ``(qt, qh, qw)`` (``video_grid``), the store's frame
record (``video_meta``), and the memory a video store would take, refused up front when it does not fit
(``check_budget``).

    >>> video_grid(13, (60, 104), (1, 2, 2))     # Wan 2.1 at 832×480, 49 frames: 13 latent frames, 2×2 patches
    (13, 30, 52)
    >>> video_grid(14, (60, 90), (2, 2, 2))      # CogVideoX 1.5 (patch_size_t 2), 13 latent frames padded to 14
    (7, 30, 45)

A video denoiser (``Family.video``) takes latents ``[batch, channel, frame, h, w]`` (Wan) or ``[batch, frame, channel,
h, w]`` (CogVideoX) and patchifies them into ``qt × qh × qw`` tokens in ``(t, h, w)`` order (the first axis slowest),
``qt = frames // pt``, ``qh = h // ph``, ``qw = w // pw`` for the denoiser's patch ``(pt, ph, pw)``; every site of
these transformers attends from all of them. A site whose queries are another number is refused, never reshaped.
"""

from __future__ import annotations

import math
import os
import shutil

import torch

from ..errors import ProbeError

__all__ = ["every_frame_vae", "decodes_in_pairs", "video_grid", "call_video", "packed_call_video", "check_grid", "frame_maps", "video_meta", "store_bytes",
           "kept_calls", "check_budget"]


def video_grid(frames: int, hw: tuple[int, int], patch) -> tuple[int, int, int]:
    """``(qt, qh, qw)``: the query grid of a video denoiser's sites, for ``frames`` latent frames of an ``hw`` latent
    and the denoiser's ``(pt, ph, pw)`` patch (latent frames, rows and columns per query token)."""
    pt, ph, pw = (int(p) for p in patch)
    return frames // pt, hw[0] // ph, hw[1] // pw


def call_video(family, denoiser, sample, hw: tuple[int, int]) -> tuple | None:
    """``(latent frames, patch, (qt, qh, qw))`` of a denoiser call of a video ``family`` (``Family.video``) with
    ``sample`` latents on an ``hw`` latent grid; ``None`` for an image family."""
    if family.video is None:
        return None
    frames, patch = family.video(denoiser, sample)
    return frames, patch, video_grid(frames, hw, patch)


def packed_call_video(family, denoiser, sample, kwargs: dict) -> tuple[tuple, tuple[int, int]]:
    """``((latent frames, patch, (qt, qh, qw)), latent (h, w))`` of a call of a video ``family`` with packed latents
    ``sample`` ``[batch, qt·qh·qw, channel]`` whose grid its keyword arguments give (``Family.packed_video``: LTX-Video's
    ``num_frames``, ``height``, ``width``, in tokens): ``qt · pt`` latent frames of ``qh · ph × qw · pw``.

    Raises:
        ProbeError: the family cannot read the call (``packed_video`` says why), or ``sample`` is not packed latents of
            that grid's token count.
    """
    grid, patch = family.packed_video(denoiser, kwargs)
    pt, ph, pw = (int(p) for p in patch)
    if not isinstance(sample, torch.Tensor) or sample.ndim != 3 or sample.shape[1] != math.prod(grid):
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise ProbeError(
            f"{type(denoiser).__name__} was called with latents of shape {shape}, not packed latents [batch, "
            f"{grid[0]}·{grid[1]}·{grid[2]} = {math.prod(grid)} tokens, channel] of the grid its arguments give "
            "(num_frames, height, width): attnprobe refuses rather than reshape them into frames it cannot tell apart"
        )
    return (grid[0] * pt, (pt, ph, pw), tuple(grid)), (grid[1] * ph, grid[2] * pw)


def check_grid(site: str, n_query: int, grid: tuple[int, int, int], frames: int, patch) -> None:
    """Raise ``ProbeError`` unless a site's ``n_query`` image queries are the ``qt × qh × qw`` of ``grid``."""
    if n_query != math.prod(grid):
        raise ProbeError(
            f"site {site}: {n_query} image queries, but {frames} latent frames in patches of {tuple(patch)} make a "
            f"{grid[0]}×{grid[1]}×{grid[2]} grid (qt×qh×qw = {math.prod(grid)}): attnprobe refuses rather than "
            "reshape them into frames it cannot tell apart"
        )


def frame_maps(site: str, probs: torch.Tensor, video) -> torch.Tensor:
    """``[sample, head, query, token]`` → ``[sample, head, qt, qh, qw, token]`` for ``video = (frames, patch, grid)``
    (the queries in ``(t, h, w)`` order, as the denoiser patchified them).

    Raises:
        ProbeError: the site's queries are not the grid's (``check_grid``).
    """
    frames, patch, grid = video
    check_grid(site, probs.shape[2], grid, frames, patch)
    return probs.unflatten(2, grid)


#: video VAEs (diffusers class names) that decode every latent frame to ``temporal_compression`` frames, the first
#: too: Allegro's
EVERY_FRAME_VAES = ("AutoencoderKLAllegro",)


def every_frame_vae(vae) -> bool:
    """Whether ``vae`` decodes every latent frame to ``temporal_compression`` frames, the first too: an instance of
    one of ``EVERY_FRAME_VAES`` (a subclass too), or Mochi's VAE set not to drop its first frames
    (``drop_last_temporal_frames = False``)."""
    import diffusers

    classes = tuple(c for c in (getattr(diffusers, n, None) for n in EVERY_FRAME_VAES) if isinstance(c, type))
    return (bool(classes) and isinstance(vae, classes)) or (_mochi_vae(vae) and not vae.drop_last_temporal_frames)


def _mochi_vae(vae) -> bool:
    """Whether ``vae`` is Mochi 1's (``AutoencoderKLMochi``): it decodes every latent frame to its
    ``temporal_compression_ratio`` frames, then (``drop_last_temporal_frames``, the default) drops the first
    ``ratio − 1`` of them, which leaves the first latent frame one frame."""
    import diffusers

    mochi = getattr(diffusers, "AutoencoderKLMochi", None)
    return isinstance(mochi, type) and isinstance(vae, mochi)


def video_meta(pipe, frames: int, patch, grid: tuple[int, int, int]) -> dict:
    """``store.meta["video"]``: ``qt``, ``latent_frames``, ``patch`` (``[pt, ph, pw]``), ``temporal_compression``
    (the pipeline's ``vae_scale_factor_temporal``: decoded frames per latent frame; ``None`` when it has none),
    ``first_frame_alone`` (the first latent frame decodes to one frame, each later one to ``temporal_compression``)
    and ``frames`` (the decoded frames: ``(latent_frames − 1) · c + 1`` when the first is alone, else
    ``latent_frames · c``).

    Wan's, HunyuanVideo's and LTX-Video's causal VAEs decode the first latent frame alone (LTX:
    ``vae_temporal_compression_ratio`` 8). Mochi 1's (``AutoencoderKLMochi``, compression its
    ``temporal_compression_ratio``, 6) decodes every latent frame to ``c`` frames and drops the first ``c − 1``: the
    first latent frame makes one frame (28 latent frames → 163 frames), unless its ``drop_last_temporal_frames`` is
    off (then ``latent_frames · c``, as Allegro's). CogVideoX's (``AutoencoderKLCogVideoX``) decodes latent frames in pairs
    (``num_latent_frames_batch_size`` 2), the first three together when their number is odd: the first alone then, and
    with an even number every latent frame makes ``c`` frames (13 latent frames → 49 frames, 12 → 48). Allegro's
    (``EVERY_FRAME_VAES``) makes ``c`` frames of every latent frame (22 → 88); its pipeline then keeps the first
    ``num_frames`` of them. ``frames`` is ``None`` where the denoiser's frames do not say it: a temporal patch ``pt > 1``
    (CogVideoX 1.5 pads its latent frames to a multiple of ``pt`` and drops the padding before decoding), no
    compression, or CogVideoX's VAE set to decode in batches of another size."""
    compression = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio",
                                                                              None)  # LTX-Video's pipelines: the latter
    compression = int(compression) if isinstance(compression, int) and compression >= 1 else None
    vae = getattr(pipe, "vae", None)
    if _mochi_vae(vae):  # its pipeline's vae_temporal_scale_factor (6) counts latent frames; the VAE decodes them
        compression = int(vae.temporal_compression_ratio)
    # only CogVideoX's VAE decodes in pairs (LTX-Video's has a num_latent_frames_batch_size too, for tiled decoding)
    batch = vae.num_latent_frames_batch_size if decodes_in_pairs(vae) else None
    every = every_frame_vae(vae)
    # CogVideoX's pairs: alone only when the first batch is of three; Allegro's: never
    first_alone = not every and (batch is None or frames % 2 == 1)
    known = compression is not None and int(patch[0]) == 1 and batch in (None, 2)
    decoded = ((frames - 1) * compression + 1 if first_alone else frames * compression) if known else None
    return {"qt": int(grid[0]), "latent_frames": int(frames), "patch": [int(p) for p in patch],
            "temporal_compression": compression, "first_frame_alone": bool(first_alone), "frames": decoded}


def decodes_in_pairs(vae) -> bool:
    """Whether ``vae`` is CogVideoX's VAE, which decodes latent frames in batches of ``num_latent_frames_batch_size``."""
    from diffusers import AutoencoderKLCogVideoX

    return isinstance(vae, AutoencoderKLCogVideoX)


def store_bytes(sites, samples: int, grid, tokens: int, heads: str, dtype: torch.dtype, calls: int) -> int:
    """Bytes of the maps of ``calls`` denoiser calls: per site ``samples × heads × qt·qh·qw × tokens`` values of
    ``dtype`` (``heads="mean"``: one head)."""
    per_call = sum(samples * (1 if heads == "mean" else max(s.heads, 1)) * math.prod(grid) * tokens for s in sites)
    return per_call * calls * torch.empty(0, dtype=dtype).element_size()


def kept_calls(scheduler, keep_call, separate: int | None = None) -> int:
    """The denoiser calls a probe keeps of the pipeline call starting now: one per entry of the scheduler's timesteps
    (as diffusers' loops run them), or two where the passes run as separate calls (``separate``: which of the two a
    step's calls the probe keeps, 0 the prompt's, 1 the unconditional one: Wan); those ``keep_call(index, timestep)``
    keeps when given; 1 when unknown."""
    table = getattr(scheduler, "timesteps", None)
    if not isinstance(table, torch.Tensor) or table.ndim != 1 or not table.numel():
        return 1
    steps = table.float().tolist()
    calls = [(i, t) for i, t in enumerate(steps)] if separate is None else [
        (2 * s + separate, t) for s, t in enumerate(steps)]
    return max(sum(bool(keep_call(i, t)) for i, t in calls) if keep_call else len(calls), 1)


def _free(device: torch.device) -> int | None:
    """Bytes of memory free now on ``device`` (CUDA: ``mem_get_info``; CPU: Linux's ``MemAvailable``, which counts
    the page cache the kernel can reclaim, else the free physical pages), or None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            try:
                with open("/proc/meminfo") as f:
                    for line in f:
                        if line.startswith("MemAvailable:"):
                            return int(line.split()[1]) * 1024  # kB
            except OSError:
                pass
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass
    return None


def check_budget(need_call: int, calls: int, device, stream_to=None, aggregate=None, free=None) -> None:
    """Refuse a recording that would not fit, before its first denoiser call.

    Args:
        need_call: bytes of one denoiser call's maps (``store_bytes`` with ``calls=1``).
        calls: the denoiser calls the store will keep in this pipeline call. device: where the maps are kept.
        stream_to: a streamed store's folder (one call in memory at a time; the shards must fit on its disk).
        aggregate: an aggregate keeps one call's worth.
        free: ``device -> free bytes or None``. Default: what the device has free now.

    Raises:
        ProbeError: the estimate is over what is free (memory of ``device``, or the disk of ``stream_to``); it says
            both and which capture-time reductions shrink it.
    """
    device = torch.device(device)
    in_memory = need_call if (stream_to is not None or aggregate) else need_call * calls
    checks = [(in_memory, (free or _free)(device), f"{device} memory")]
    if stream_to is not None:
        folder = os.fspath(stream_to)
        while folder and not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        try:
            checks.append((need_call * calls, shutil.disk_usage(folder or ".").free, f"disk space at {stream_to!r}"))
        except OSError:
            pass
    for need, have, where in checks:
        if have is not None and need > have:
            raise ProbeError(
                f"this video store would take about {need / 2**30:.3g} GiB ({need_call / 2**30:.3g} GiB per denoiser "
                f"call × {calls} calls kept), more than the {have / 2**30:.3g} GiB of {where} free now: refused before "
                "the first denoiser call. Shrink it at capture time: heads='mean', tokens='<concept>', calls=..., "
                "sites=..., aggregate='mean' (one call's worth) or stream_to=<folder> (one call in memory)"
            )
