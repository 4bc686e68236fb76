"""The study on a video denoiser: how many frames each video has, the noise every row starts from, and which frames
stand for a video in the figures, the page and the presence scorer.

    >>> from attnprobe.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("wan")
    >>> is_video(pipe), temporal_compression(pipe), check_frames(pipe, None, "tiny-wan")
    (True, 4, 9)

A study reads everything here from the pipeline and its store, never from a list of families: the temporal compression
(the pipeline's ``vae_scale_factor_temporal``, ``vae_temporal_compression_ratio`` or ``vae_temporal_scale_factor``),
whether ``__call__`` takes ``num_frames``, and the frame record of the store it probed (``store.video``, ``attnprobe.analysis.decoded_frame_index``).

- **Frames**: ``frames`` decoded frames per video (``num_frames``); default ``DEFAULT_LATENT_FRAMES`` latent frames,
  ``(3 − 1) · c + 1`` decoded frames for a temporal compression ``c`` (9 for Wan, SkyReels-V2 and CogVideoX). A causal
  video VAE decodes the first latent frame alone and each later one to ``c`` frames, so a count other than
  ``k · c + 1`` is refused (Wan's pipeline would round it, CogVideoX's would cut it short).
- **Noise**: every row of a cell starts from the seed's noise, drawn by the pipeline itself in its own latent layout
  (Wan ``[B, C, F, h, w]``, CogVideoX ``[B, F, C, h, w]``, packed tokens elsewhere) from one generator per video, each
  seeded with the seed (``noise``): the same noise for every video of the call, whatever the layout.
- **The still of a video** (thumbnail, the heat-map figure, presence): its middle decoded frame, ``frames[n // 2]``
  (``middle_frame``); the mean map over latent frames is drawn over it.
- **Frames in the figures and the page**: per latent frame, its map over the decoded frame in the middle of the ones
  it decodes to (``frame_stills``).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from ..analysis import decoded_frame_index, heatmap
from ..capture import denoiser_of, family_of
from ..capture.frames import decodes_in_pairs, every_frame_vae
from ..errors import AttnprobeError, ConfigError, StoreError

__all__ = ["DEFAULT_LATENT_FRAMES", "FRAME_THUMBNAIL", "is_video", "temporal_compression", "frame_argument", "check_frames",
           "video_options", "noise", "middle_frame", "as_stills", "frame_stills", "frame_maps", "frame_record"]

#: Latent frames of a video when ``frames`` is not given: the fewest that show a first frame, a middle and an end.
DEFAULT_LATENT_FRAMES = 3
#: The largest side of the frame images a cell keeps per latent frame (pixels).
FRAME_THUMBNAIL = 64


def is_video(pipe) -> bool:
    """Whether the pipeline's denoiser is of a family that records a frame axis (``Family.video``)."""
    return family_of(denoiser_of(pipe)).video is not None


def temporal_compression(pipe) -> int | None:
    """Decoded frames per latent frame after the first: the pipeline's ``vae_scale_factor_temporal`` (Wan, CogVideoX,
    HunyuanVideo), ``vae_temporal_compression_ratio`` (LTX) or ``vae_temporal_scale_factor`` (Mochi 1); ``None``
    when it has none of them."""
    for name in ("vae_scale_factor_temporal", "vae_temporal_compression_ratio", "vae_temporal_scale_factor"):
        value = getattr(pipe, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def frame_argument(pipe) -> str | None:
    """The name of the pipeline's frame-count argument: ``num_frames`` (Wan, CogVideoX, …) or ``frames``
    (Sana-Video); ``None`` when ``__call__`` takes neither."""
    params = inspect.signature(type(pipe).__call__).parameters
    return next((name for name in ("num_frames", "frames") if name in params), None)


def check_frames(pipe, frames: int | None, model: str) -> int:
    """The decoded frames per video of a video pipeline: ``frames``, checked, or the default (``DEFAULT_LATENT_FRAMES``
    latent frames).

    A VAE that decodes every latent frame to ``c`` frames (Allegro's, ``capture.frames.every_frame_vae``) makes
    ``k · c`` frames; a causal one (the first latent frame alone) ``k · c + 1``.

    Raises:
        ConfigError (a ValueError): the pipeline's ``__call__`` takes no ``num_frames`` (or ``frames``); ``frames``
            below 1 or not a count the VAE makes (the message gives the counts around it).
    """
    if frame_argument(pipe) is None:
        raise ConfigError(f"model {model!r} ({type(pipe).__name__}) records a frame axis, but its pipeline takes no "
                          "num_frames: the study cannot set its frame count")
    c = temporal_compression(pipe) or 1
    if every_frame_vae(getattr(pipe, "vae", None)):
        if frames is None:
            return DEFAULT_LATENT_FRAMES * c
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or frames % c:
            lower = max(c, (frames // c) * c) if isinstance(frames, int) and not isinstance(frames, bool) else c
            raise ConfigError(f"frames {frames!r}: model {model!r}'s VAE decodes every latent frame to {c} frames, so "
                              f"a video has k·{c} frames: use {lower} or {lower + c}")
        return frames
    if frames is None:
        return (DEFAULT_LATENT_FRAMES - 1) * c + 1
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ConfigError(f"frames must be a whole number ≥ 1; got {frames!r}")
    if (frames - 1) % c:
        lower = (frames - 1) // c * c + 1
        raise ConfigError(f"frames {frames}: model {model!r} compresses time by {c} (its VAE decodes the first latent "
                          f"frame alone, then {c} frames per latent frame), so a video has k·{c} + 1 frames: use "
                          f"{lower} or {lower + c}")
    if decodes_in_pairs(getattr(pipe, "vae", None)) and ((frames - 1) // c) % 2:
        # CogVideoX's VAE decodes an even number of latent frames in pairs, every one to c frames: not `frames` frames
        latent = (frames - 1) // c + 1
        raise ConfigError(f"frames {frames}: model {model!r}'s VAE (CogVideoX's) decodes latent frames in pairs, so "
                          f"its {latent} latent frames would make {latent * c} frames, not {frames}: use "
                          f"{frames - c} or {frames + c} (an odd number of latent frames)")
    return frames


def video_options(pipe, frames: int) -> dict:
    """The call options of a video pipeline: its frame count (``frame_argument``), and PIL frames out
    (``output_type="pil"``) where it takes an ``output_type``."""
    options = {frame_argument(pipe) or "num_frames": int(frames)}
    if "output_type" in inspect.signature(type(pipe).__call__).parameters:
        options["output_type"] = "pil"
    return options


def noise(seed: int, copies: int) -> dict:
    """One CPU generator per video, each seeded with ``seed``: the pipeline draws every video's noise alike, in its
    own latent layout (diffusers' ``randn_tensor`` draws a batch row per generator)."""
    return {"generator": [torch.Generator("cpu").manual_seed(int(seed)) for _ in range(copies)]}


def as_stills(frames) -> list:
    """One video's frames as a list of RGB PIL images: a list of PIL images, a ``[frame, H, W, C]`` array (floats in
    [0, 1] or uint8) or a ``[frame, C, H, W]`` tensor.

    Raises:
        StoreError: no frames, or an array that is not one video.
    """
    from PIL import Image

    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu()
        frames = frames.permute(0, 2, 3, 1).numpy() if frames.ndim == 4 and frames.shape[1] in (1, 3, 4) else frames.numpy()
    if isinstance(frames, (list, tuple)) and frames and all(isinstance(f, Image.Image) for f in frames):
        return [f.convert("RGB") for f in frames]
    arr = np.asarray(frames)
    if arr.ndim != 4 or not len(arr) or arr.shape[-1] not in (1, 3, 4):
        raise StoreError(f"a video's frames of shape {arr.shape}: expected [frame, H, W, C] or PIL images")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    arr = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr, 3, axis=-1)
    return [Image.fromarray(a) for a in arr]


def middle_frame(frames):
    """The still that stands for a video: its middle decoded frame, ``frames[n // 2]`` (frame 4 of 9), as PIL."""
    stills = as_stills(frames)
    return stills[len(stills) // 2]


def frame_spans(store, n: int) -> list[list[int]] | None:
    """Per latent frame (``qt`` position), ``[first, last]`` of the decoded frames it shows; ``None`` where the store
    cannot say (``decoded_frame_index`` refuses: CogVideoX 1.5's padded latent frames)."""
    try:
        index = decoded_frame_index(store, n)
    except AttnprobeError:
        return None
    spans = []
    for q in range(store.video["qt"]):
        shown = [f for f, i in enumerate(index) if i == q]
        spans.append([shown[0], shown[-1]] if shown else None)
    return spans


def frame_record(store, n: int) -> dict:
    """What a cell records of its videos: ``frames`` (decoded), ``latent_frames``, ``qt``, ``shown`` (the middle
    decoded frame, the still), ``spans`` (per latent frame, its decoded frames ``[first, last]``, or ``None``)."""
    video = store.video
    return {"frames": int(n), "latent_frames": int(video["latent_frames"]), "qt": int(video["qt"]),
            "shown": int(n) // 2, "spans": frame_spans(store, n)}


def frame_stills(frames, spans, side: int = FRAME_THUMBNAIL) -> torch.Tensor | None:
    """Per latent frame, the decoded frame in the middle of those it shows, ``[qt, h, w, 3]`` uint8 at most ``side``
    pixels a side; ``None`` without ``spans``."""
    if not spans or any(s is None for s in spans):
        return None
    stills = as_stills(frames)
    out = []
    for first, last in spans:
        still = stills[(first + last) // 2].copy()
        still.thumbnail((side, side))
        out.append(torch.from_numpy(np.asarray(still, dtype=np.uint8).copy()))
    return torch.stack(out)


def frame_maps(store, concept: str, sample: int, shape: tuple[int, int]) -> torch.Tensor:
    """The requested (last) mention's map per latent frame, ``[qt, h, w]`` float16: ``heatmap(frame="all")`` (sites,
    calls and heads averaged) resized to ``shape``.

    Raises:
        StoreError: an image store.
    """
    if store.video is None:
        raise StoreError("frame_maps needs a video store")
    return heatmap(store, concept, sample, occurrence=-1, size=tuple(shape), frame="all").half()
