"""Denoisers that fold the frames of their ``[batch, channel, frame, h, w]`` latents into the batch of their sites
(``Family.frames_in_batch``: AnimateDiff's ``UNetMotionModel``): site row ``b · frames + f`` is latent row ``b``'s
frame ``f``, and the encoder states come with one row per ``(row, frame)`` in that order, each latent row's repeated.

    >>> frame_rows(slice(1, 2), 3)                      # the cond row of [uncond, cond], 3 frames
    slice(3, 6, None)
    >>> frame_rows(torch.tensor([0, 2]), 2).tolist()    # rows 0 and 2
    [0, 1, 4, 5]
    >>> fold_frames(torch.zeros(2 * 3, 4, 16, 7), 3, (4, 4)).shape   # [sample·frame, head, query, token]
    torch.Size([2, 4, 3, 4, 4, 7])

The probe labels and selects latent rows as for an image UNet (``latent_states``: each latent row's states, read
from the first of its frames' rows), computes the maps of the kept samples' ``(row, frame)`` rows (``frame_rows``:
``CaptureState.rows`` at the sites) and regroups them into ``[sample, head, qt, qh, qw, token]`` (``fold_frames``).
"""

from __future__ import annotations

import weakref

import torch

from ..errors import ProbeError

__all__ = ["latent_states", "frame_rows", "fold_frames", "frame_record"]

#: the last ``latent_states`` result: (weak reference to the states tensor, frames, its per-latent-row view), so a
#: pipeline's one ``prompt_embeds`` tensor gives one view object for every call (the probe tells a change of
#: conditioning by the states' identity) and is checked once
_LAST: list = [None, None, None]


def latent_states(states, batch: int, frames: int, denoiser: str):
    """``[batch · frames, token, hidden]`` encoder states → the ``[batch, token, hidden]`` view of each latent row's
    first frame, after checking that each row's ``frames`` rows are equal (the pipeline repeats them: AnimateDiff's
    ``prompt_embeds.repeat_interleave(num_frames)``). Anything not a 3-D tensor is handed back as it is.

    Raises:
        ProbeError: the states have another number of rows, or a row's frames have different states (per-frame
            prompts): one label per latent row would not describe them.
    """
    if not isinstance(states, torch.Tensor) or states.ndim != 3:
        return states
    ref, n, view = _LAST
    if ref is not None and ref() is states and n == frames:
        return view
    if states.shape[0] != batch * frames:
        raise ProbeError(
            f"{denoiser} was called with {batch} latent rows of {frames} frames but encoder_hidden_states of "
            f"{states.shape[0]} rows, not one per (row, frame) = {batch * frames}: attnprobe cannot tell which sample "
            "and frame each site row is"
        )
    grouped = states.unflatten(0, (batch, frames))
    if frames > 1 and not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
        raise ProbeError(
            f"{denoiser}: the encoder_hidden_states of a latent row differ between its {frames} frames (a prompt per "
            "frame?); attnprobe labels one prompt per sample and refuses rather than mislabel frames"
        )
    view = grouped[:, 0]
    _LAST[:] = [weakref.ref(states), frames, view]
    return view


def frame_rows(rows, frames: int):
    """The site rows of latent ``rows`` (``CaptureState.rows``: a ``slice`` of step 1, a long tensor, or ``None``):
    every frame of each, ``b · frames + f`` in ``(row, frame)`` order; a ``slice`` stays a ``slice``."""
    if rows is None or frames == 1:
        return rows
    if isinstance(rows, slice):
        return slice((rows.start or 0) * frames, None if rows.stop is None else rows.stop * frames)
    return (rows[:, None] * frames + torch.arange(frames, device=rows.device)).flatten()


def fold_frames(probs: torch.Tensor, frames: int, grid: tuple[int, int]) -> torch.Tensor:
    """``[sample · frame, head, query, token]`` (rows in ``(sample, frame)`` order) → ``[sample, head, qt, qh, qw,
    token]`` with ``qt = frames`` and ``(qh, qw) = grid``, the site's query grid of each frame."""
    if probs.shape[0] % frames:
        raise ProbeError(f"{probs.shape[0]} site rows are not whole samples of {frames} frames")
    return probs.unflatten(0, (-1, frames)).transpose(1, 2).unflatten(3, tuple(grid))


def frame_record(meta: dict) -> dict:
    """``store.meta["video"]`` of a frames-in-batch denoiser: its VAE decodes each latent frame alone (an image VAE,
    no temporal compression), so one decoded frame per latent frame."""
    return {**meta, "temporal_compression": 1, "first_frame_alone": True, "frames": meta["latent_frames"]}
