"""Video stores over their decoded frames: which latent frame each decoded frame shows (``decoded_frame_index``), a
concept's heat map per decoded frame (``frame_heatmaps``) and an animated GIF of it over the video
(``animate_heatmap``, written with Pillow).

    >>> from attnprobe.testing import synthetic_video_store
    >>> store = synthetic_video_store(frames=3, temporal_compression=4)     # 3 latent frames: 9 decoded frames
    >>> decoded_frame_index(store, 9)
    [0, 1, 1, 1, 1, 2, 2, 2, 2]

Wan's, CogVideoX's and LTX-Video's VAEs are causal in time: the first latent frame decodes to the first frame alone,
and each later one to ``temporal_compression`` frames (4; LTX-Video's 8), so ``frames = (latent_frames − 1) · 4 + 1``
— except CogVideoX's
with an even number of latent frames, which it decodes in pairs, each latent frame to 4 frames
(``store.video["first_frame_alone"]`` says which; ``attnprobe.capture.frames.video_meta``). A query frame ``qt``
covers ``pt`` latent frames (the denoiser's temporal patch: 1 for Wan, CogVideoX and LTX-Video, 2 for CogVideoX 1.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_path
from ..errors import ArgumentError, StoreError, StoreIOError
from ..store import AttentionStore
from .measures import heatmap, require_store, require_video

__all__ = ["decoded_frame_index", "frame_heatmaps", "animate_heatmap"]


def decoded_frame_index(store: AttentionStore, n_frames: int) -> list[int]:
    """For each of ``n_frames`` decoded frames, its position on the store's ``qt`` axis.

    Raises:
        StoreError: an image store; a store whose decoded frame count is unknown (``store.video["frames"]`` is
            ``None`` with a temporal compression: CogVideoX 1.5's padded latent frames). ArgumentError: ``n_frames``
            is not the store's decoded frame count (``store.video["frames"]``; the latent frame count when the
            pipeline has no temporal compression).
    """
    video = require_video(store, "decoded_frame_index")
    latent, c, pt, qt = video["latent_frames"], video.get("temporal_compression"), video["patch"][0], video["qt"]
    if c and not video.get("frames"):
        raise StoreError(f"this store's {latent} latent frames (temporal patch {pt}, compression {c}) do not say which "
                         "decoded frame each is: a pipeline that pads its latent frames to a multiple of the patch "
                         "(CogVideoX 1.5) drops the padding before decoding. Use heatmap(frame=...) per latent frame")
    expected = video.get("frames") or latent
    if not isinstance(n_frames, int) or isinstance(n_frames, bool) or n_frames != expected:
        raise ArgumentError(
            f"{n_frames!r} decoded frames, but this store's {latent} latent frames decode to {expected} frames "
            f"(temporal compression {c}): pass the frames of the video the probed pipeline call made"
            + ("; a pipeline that keeps only the first frames of those it decodes (Allegro's, with a num_frames that is "
               f"not a multiple of {c}) made fewer: use heatmap(frame=...) per latent frame"
               if isinstance(n_frames, int) and c and n_frames < expected and not video.get("first_frame_alone", True)
               else ""))
    if not c:
        causal = list(range(n_frames))
    elif video.get("first_frame_alone", True):  # Wan; CogVideoX with an odd number of latent frames
        causal = [0 if f == 0 else (f - 1) // c + 1 for f in range(n_frames)]
    else:  # CogVideoX with an even number, Allegro: every latent frame decodes to c frames
        causal = [f // c for f in range(n_frames)]
    index = [lat // pt for lat in causal]
    if max(index) >= qt:
        raise StoreError(f"latent frames {sorted({lat for lat, q in zip(causal, index) if q >= qt})} lie past the "
                         f"{qt} query frames (patch {pt}): the denoiser dropped them, and no map covers them")
    return index


def frame_heatmaps(store: AttentionStore, concept: str, n_frames: int, size: tuple[int, int], *, sample: int = 0,
                   calls=None, sites=None, occurrence="all", generation: int | None = None) -> torch.Tensor:
    """A concept's heat map on each decoded frame: ``[frame, H, W]`` float32, ``heatmap(frame="all")`` (the mean over
    sites, calls and heads of the attention on the concept's tokens, bilinear to ``size``) picked per decoded frame by
    ``decoded_frame_index``. Units: attention probability (not normalised).

    Raises:
        As ``heatmap`` and ``decoded_frame_index`` (ArgumentTypeError: ``store`` is not an ``AttentionStore``).
    """
    require_store(store, "frame_heatmaps")
    index = decoded_frame_index(store, n_frames)
    maps = heatmap(store, concept, sample, calls=calls, sites=sites, occurrence=occurrence, size=size,
                   generation=generation, frame="all")  # [qt, H, W]
    return maps[index]


def _as_frames(frames) -> np.ndarray:
    """One video's frames as float ``[frame, H, W, 3]`` in ``[0, 1]``: a list of PIL images or ``[H, W, C]`` arrays, or
    a ``[frame, H, W, C]`` / ``[frame, C, H, W]`` array or tensor (C 1, 3 or 4; floats in [0, 1] or uint8)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    if isinstance(frames, (list, tuple)):
        frames = [np.asarray(f) for f in frames]
        if not frames or len({f.shape for f in frames}) != 1:
            raise ArgumentError(f"frames: give one video's frames, all of one size; got {len(frames)} of shapes "
                                f"{sorted({f.shape for f in frames})[:3]}")
        frames = np.stack(frames)
    arr = np.asarray(frames)
    if arr.ndim == 4 and arr.shape[1] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(0, 2, 3, 1)  # [frame, C, H, W] → [frame, H, W, C]
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ArgumentError(f"frames of shape {arr.shape}: give one video, [frame, H, W, C] or [frame, C, H, W] (a "
                            "pipeline's output .frames[0]), or a list of images")
    arr = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
    arr = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr, 3, axis=-1)
    return np.clip(arr, 0.0, 1.0)


def animate_heatmap(store: AttentionStore, concept: str, frames, path, *, sample: int = 0, calls=None, sites=None,
                    occurrence="all", generation: int | None = None, fps: float = 8.0, alpha: float = 0.5,
                    cmap: str = "viridis") -> Path:
    """An animated GIF of a concept's heat map over the decoded video: each frame the video's frame with its latent
    frame's map laid over it (``frame_heatmaps``, divided by its maximum over the whole video so that frames compare;
    colours from matplotlib's ``cmap``), written with Pillow, atomically.

    Args:
        store: a video store. concept, sample, calls, sites, occurrence, generation: as for ``heatmap``.
        frames: the decoded frames of the probed pipeline call's video for that sample: ``output.frames[i]`` with
            ``output_type="pt"`` (``[frame, C, H, W]``) or ``"np"`` (``[frame, H, W, C]``), or a list of PIL images.
        path: where the GIF goes (``.gif``). fps: frames per second. Default: 8. alpha: the map's opacity, 0–1.
            Default: 0.5. cmap: a matplotlib colormap name. Default: ``"viridis"`` (as every figure).

    Returns:
        The path written.

    Raises:
        ArgumentTypeError: ``store`` is not an ``AttentionStore``.
        StoreError: an image store. ArgumentError: frames that are not one video of the store's decoded frame count;
            a path not ending in ``.gif``, a folder, or in a folder that does not exist; ``fps`` ≤ 0 or ``alpha``
            outside [0, 1]; an unknown ``cmap``. ConceptError: see ``heatmap``. StoreIOError: the file cannot be
            written.

    Examples:
        >>> import tempfile, torch
        >>> from attnprobe.testing import synthetic_video_store
        >>> store = synthetic_video_store(frames=3, prompt="a dog", frame_mass={"dog": [0.1, 0.2, 0.6]})
        >>> out = animate_heatmap(store, "dog", torch.rand(9, 3, 16, 16), Path(tempfile.mkdtemp()) / "dog.gif")
        >>> from PIL import Image
        >>> Image.open(out).n_frames
        9
    """
    from matplotlib import colormaps
    from PIL import Image

    require_store(store, "animate_heatmap")
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ArgumentError(f"path {str(path)!r}: animate_heatmap writes a GIF; give a path ending in .gif")
    if not (isinstance(fps, (int, float)) and fps > 0) or not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ArgumentError(f"fps={fps!r} must be > 0 and alpha={alpha!r} in [0, 1]")
    if path.is_dir() or not path.parent.is_dir():
        raise ArgumentError(f"path {str(path)!r}: " + ("it is a folder" if path.is_dir() else
                            f"its folder {str(path.parent)!r} does not exist") + "; give a .gif file in an existing folder")
    if cmap not in colormaps:
        raise ArgumentError(f"cmap={cmap!r} is not a matplotlib colormap (e.g. 'jet', 'viridis', 'magma')")
    video = _as_frames(frames)
    maps = frame_heatmaps(store, concept, len(video), tuple(video.shape[1:3]), sample=sample, calls=calls, sites=sites,
                          occurrence=occurrence, generation=generation).numpy()
    top = float(maps.max())
    colours = colormaps[cmap](maps / top if top > 0 else maps)[..., :3]  # [frame, H, W, 3]
    blended = (1 - alpha) * video + alpha * colours
    images = [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in blended]
    try:
        with atomic_path(path) as tmp:
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                           loop=0)
    except OSError as exc:  # a full disk, a read-only folder: named by the path asked for, not the temporary one
        raise StoreIOError.of(exc, path) from None
    return path
