"""One denoiser call as the hooks see it: its arguments (``DenoiserCall.read``), the scheduler timestep it stands for
(``Timesteps``), and the grid of each site's image queries (``query_grid``).

    >>> import torch
    >>> call = DenoiserCall.read((torch.zeros(2, 4, 8, 12), torch.tensor(981)), {"encoder_hidden_states": torch.zeros(2, 77, 32)})
    >>> call.batch, call.latent_hw(), call.text_len
    (2, (8, 12), 77)
    >>> query_grid(24, (8, 12))            # a site at half the latent resolution
    (4, 6)

The probe (``attnprobe.capture.recorder``) and the interventions (``attnprobe.interventions``) read the arguments of
the same pre-forward hook the same way: ``(sample, timestep, encoder_hidden_states)`` positionally or by name, as
diffusers' pipelines call UNets and transformers (Stable Cascade's prior: ``timestep_ratio`` and ``clip_text``, by
name).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from ..errors import ProbeError

__all__ = ["DenoiserCall", "Timesteps", "query_grid", "packed_grid", "generated_tokens", "pad_rows", "first_value", "row_mask",
           "schedule_meta"]


def first_value(timestep) -> float:
    """A timestep argument as one float: its first element when it is a tensor per sample; NaN when there is none."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else float("nan")
    return float(timestep) if timestep is not None else float("nan")


@dataclass
class DenoiserCall:
    """The arguments of one denoiser call.

    Attributes:
        sample: the latents, ``[batch, channel, h, w]`` (or ``[batch, token, channel]`` packed, with ``img_ids``).
        timestep: as passed (a tensor, a number or ``None``; Stable Cascade: its ``timestep_ratio``, 1 → 0).
        states: ``encoder_hidden_states`` ``[batch, token, hidden]`` (the text part of IP-Adapter's tuple; Stable
            Cascade's prior: ``clip_text``), or ``None``.
        mask: ``encoder_attention_mask`` (PixArt: T5's padding mask, 1 = attended), or ``None``.
        img_ids: Flux's packed-latent position ids ``[token, (0, row, column)]``, or ``None``.
        image_prompt: ``encoder_hidden_states`` came as IP-Adapter's ``(text states, image-prompt states)``.
        shapes: Qwen-Image's ``img_shapes`` (per sample ``[(frames, rows, columns)]`` of packed tokens), or ``None``.
        more_text: text positions the denoiser joins after ``states`` (HunyuanDiT's ``encoder_hidden_states_t5``;
            HiDream's states are its T5's, then two Llama layers'; HunyuanImage's ByT5 ``encoder_hidden_states_2``), or 0.
    """

    sample: object
    timestep: object
    states: object
    mask: object
    img_ids: object
    image_prompt: bool
    shapes: object = None
    more_text: int = 0

    @classmethod
    def read(cls, args: tuple, kwargs: dict) -> "DenoiserCall":
        """Read a pre-forward hook's ``(args, kwargs)``."""
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states", kwargs.get("x")))
        timestep = args[1] if len(args) > 1 else _named(kwargs, "timestep", "t", "timesteps", "timestep_ratio")
        # Z-Image's captions (cap_feats), HiDream's T5 states (then its Llama layers: more_text), Stable Cascade's
        # prior's per-token CLIP text (clip_text)
        states = args[2] if len(args) > 2 else _named(kwargs, "encoder_hidden_states", "cap_feats",
                                                      "encoder_hidden_states_t5", "clip_text")
        mask, ids = kwargs.get("encoder_attention_mask"), kwargs.get("img_ids")
        if isinstance(sample, (list, tuple)):  # Z-Image: a latent and a caption (its own length) per row
            sample, states, mask = _rows_joined(sample, states)
        image_prompt = isinstance(states, (tuple, list)) and bool(states)
        if image_prompt:  # IP-Adapter: (text states, image-prompt states)
            states = states[0]
        states = _one_text_axis(states)  # Allegro: [batch, 1, token, hidden]
        shapes, t5, llama = kwargs.get("img_shapes"), kwargs.get("encoder_hidden_states_t5"), kwargs.get(
            "encoder_hidden_states_llama3")
        more = int(t5.shape[1]) if isinstance(t5, torch.Tensor) and t5.ndim == 3 and t5 is not states else 0
        if isinstance(llama, torch.Tensor) and llama.ndim == 4:  # HiDream: [layer, batch, token, hidden], read twice
            more += 2 * int(llama.shape[2])
        glyphs = kwargs.get("encoder_hidden_states_2")  # HunyuanImage's ByT5 positions, joined to the text
        more += int(glyphs.shape[1]) if isinstance(glyphs, torch.Tensor) and glyphs.ndim == 3 else 0
        return cls(sample, timestep, states, mask if isinstance(mask, torch.Tensor) else None,
                   ids if isinstance(ids, torch.Tensor) else None, image_prompt,
                   shapes if isinstance(shapes, (list, tuple)) and shapes else None, more)

    @staticmethod
    def with_states(args: tuple, kwargs: dict, states) -> tuple[tuple, dict]:
        """A pre-forward hook's ``(args, kwargs)`` with ``encoder_hidden_states`` replaced by ``states``."""
        if len(args) > 2:
            return (*args[:2], states, *args[3:]), kwargs
        return args, {**kwargs, "encoder_hidden_states": states}

    @property
    def batch(self) -> int:
        return int(self.sample.shape[0])

    @property
    def packed(self) -> bool:
        """Flux-style packed latents: ``[batch, token, channel]`` with ``img_ids`` (or Qwen-Image's ``img_shapes``)."""
        return isinstance(self.sample, torch.Tensor) and self.sample.ndim == 3 and (
            self.img_ids is not None or self.shapes is not None)

    @property
    def text_len(self) -> int:
        """Text tokens the denoiser was called with (0 without encoder states; HunyuanDiT: its CLIP's, then its T5's)."""
        states = self.states
        return int(states.shape[1]) + self.more_text if isinstance(states, torch.Tensor) and states.ndim == 3 else 0

    def check(self, denoiser: torch.nn.Module, kernel: bool = False, video: bool = False,
              packed_video: bool = False) -> None:
        """Raise ``ProbeError`` unless the call has 4-D latents (5-D, ``video``: a video denoiser's frames; 3-D,
        ``packed_video``: LTX-Video's packed tokens, whose grid ``capture.frames.packed_call_video`` checks) or packed
        latents with ``img_ids``; with ``kernel``
        (a family read at the attention kernel), also when the denoiser is compiled: its processors run outside the
        compiled graph (a graph break at each site), which fuses the rest differently, so images would not stay
        bit-identical."""
        if kernel and (getattr(denoiser, "_compiled_call_impl", None) is not None or hasattr(denoiser, "_orig_mod")):
            raise ProbeError(
                f"{type(denoiser).__name__} is compiled (torch.compile): its family is read at the attention kernel, "
                "outside the compiled graph, which would change its images. Probe it uncompiled"
            )
        ndim = 3 if packed_video else 5 if video else 4
        if not isinstance(self.sample, torch.Tensor) or (self.sample.ndim != ndim and not self.packed):
            raise ProbeError(
                f"the denoiser {type(denoiser).__name__} was called without a {ndim}-D latent sample or "
                "packed latents with "
                f"img_ids or img_shapes (got {type(self.sample).__name__}); attnprobe supports denoisers called as diffusers "
                "pipelines do"
            )

    def latent_hw(self, packed_hw=None, channels_last: bool = False) -> tuple[int, int]:
        """The latent grid: the sample's last two axes (``channels_last``: the two before its last, Kandinsky 5's
        ``[batch, frame, h, w, channel]``), or for packed latents ``packed_hw(img_ids)`` (default: ``packed_grid``; the
        probe passes a cached one, as reading GPU ids synchronises)."""
        if channels_last:
            return int(self.sample.shape[-3]), int(self.sample.shape[-2])
        if self.packed and self.img_ids is None:  # img_shapes: [(frames, rows, columns)] of 2×2 patches, per sample
            first = self.shapes[0][0] if isinstance(self.shapes[0], list) else self.shapes[0]
            return 2 * int(first[-2]), 2 * int(first[-1])
        if self.packed:
            return (packed_hw or packed_grid)(self.img_ids)
        return int(self.sample.shape[-2]), int(self.sample.shape[-1])


def row_mask(denoiser: torch.nn.Module, call: DenoiserCall) -> torch.Tensor:
    """The attended text positions of each batch row, ``[batch, text]`` booleans, of a denoiser whose processor calls
    the kernel once per row over them (``Family.row_calls``: Mochi 1 picks ``encoder_attention_mask.nonzero()``).

    Raises:
        ProbeError: the call has no ``encoder_attention_mask`` keyword, or not one ``[batch, text]`` mask of its
            ``encoder_hidden_states`` (what was passed and what is read are named).
    """
    mask, states = call.mask, call.states
    want = (call.batch, int(states.shape[1])) if isinstance(states, torch.Tensor) and states.ndim == 3 else None
    if mask is None or want is None or tuple(mask.shape) != want:
        got = "none" if mask is None else f"shape {tuple(mask.shape)}"
        raise ProbeError(
            f"{type(denoiser).__name__} was called with encoder_attention_mask {got}; attnprobe reads its attention "
            "one batch row at a time over the text positions that mask keeps, so it needs the mask by keyword, "
            f"[batch, text] = {list(want) if want else 'those of encoder_hidden_states (by keyword too)'}, as its "
            "pipeline passes them"
        )
    return mask != 0


def _named(kwargs: dict, *names: str):
    """The first of ``names`` that ``kwargs`` holds (not ``None``), else ``None``."""
    return next((kwargs[n] for n in names if kwargs.get(n) is not None), None)


def pad_rows(rows) -> torch.Tensor | None:
    """Per-row ``[token, hidden]`` tensors of their own lengths as one ``[row, token, hidden]`` tensor, zero-padded
    (``None`` unless ``rows`` is a non-empty list of 2-D tensors)."""
    if not isinstance(rows, (list, tuple)) or not rows or not all(isinstance(r, torch.Tensor) and r.dim() == 2
                                                                    for r in rows):
        return None
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True)


#: the last call's caption list, weakly, and its joined tensors: the pipeline builds a new list each step from the
#: same tensors, and the probe tells a change of conditioning by the states tensor's identity
_JOINED: list = [(), None, None]


def _one_text_axis(states):
    """``encoder_hidden_states`` of ``[batch, 1, token, hidden]`` (Allegro's pipeline adds the 1; its transformer
    views them as ``[batch, token, hidden]``) as that view, the same view object for the same tensor from call to call
    (the probe tells a changed conditioning by identity); anything else as it is."""
    if not (isinstance(states, torch.Tensor) and states.dim() == 4 and states.shape[1] == 1):
        return states
    ref, view = _SQUEEZED
    if ref is None or ref() is not states:
        view = states[:, 0]
        _SQUEEZED[:] = [weakref.ref(states), view]
    return view


#: the last ``_one_text_axis``: a weak reference to the tensor given, and its view
_SQUEEZED: list = [None, None]


def _rows_joined(latents, captions):
    """A denoiser called with one ``[channel, 1, h, w]`` latent and one ``[token, hidden]`` caption per row
    (Z-Image): the latents stacked ``[row, channel, h, w]``, the captions zero-padded ``[row, token, hidden]`` and
    their mask ``[row, token]`` (1 = the row's own position)."""
    if not latents or not all(isinstance(x, torch.Tensor) and x.dim() in (3, 4) for x in latents) \
            or len({tuple(x.shape) for x in latents}) != 1:
        raise ProbeError(
            "the denoiser was called with a list of latents that are not one [channel, frame, h, w] tensor per row "
            "of one shape (Z-Image's omni mode: several images per row); attnprobe records one image per row"
        )
    sample = torch.stack(list(latents))
    sample = sample[:, :, 0] if sample.dim() == 5 and sample.shape[2] == 1 else sample
    refs, states, mask = _JOINED
    if len(refs) != len(captions or ()) or any(r() is not c for r, c in zip(refs, captions)):
        states = pad_rows(captions)
        mask = None if states is None else (torch.arange(states.shape[1], device=states.device)[None, :]
                                            < torch.tensor([len(c) for c in captions], device=states.device)[:, None]).long()
        _JOINED[:] = [tuple(weakref.ref(c) for c in captions), states, mask]
    return sample, states, mask


def generated_tokens(img_ids: torch.Tensor) -> int:
    """How many of a packed call's image tokens are the generated image's: the leading ones whose ids ``[token, (0,
    row, column)]`` share the first token's first coordinate. FluxKontextPipeline appends its input image's tokens
    after them with first coordinate 1 (image-conditioning tokens: keys of every attention, not image positions);
    Flux.2's four-coordinate ids are counted whole."""
    ids = img_ids.reshape(-1, img_ids.shape[-1])
    if ids.shape[-1] == 4:
        return int(ids.shape[0])
    return int((ids[:, 0] == ids[0, 0]).int().cumprod(0).sum())


def packed_grid(img_ids: torch.Tensor) -> tuple[int, int]:
    """The latent size of packed latents (Flux: 2×2 latent patches per token) from their position ids
    ``[token, (0, row, column)]`` (Flux.2: ``(t, row, column, l)``): twice the token grid of the generated image's tokens
    (``generated_tokens``). Rows and columns are counted from the smallest id (LongCat's image ids start at 512, after
    its text's)."""
    ids = img_ids.reshape(-1, img_ids.shape[-1])
    ids = ids[:generated_tokens(ids)]
    row, col = (1, 2) if ids.shape[-1] == 4 else (-2, -1)
    span = lambda axis: int(ids[:, axis].max()) - int(ids[:, axis].min()) + 1  # noqa: E731
    rows, cols = span(row), span(col)
    return 2 * rows, 2 * cols


def query_grid(n_query: int, hw: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(qh, qw)`` grid of a site with ``n_query`` image queries on an ``hw`` latent: the latent grid at the
    first power-of-two scale (1, 1/2, … 1/128, rounding up) whose size is ``n_query``; ``None`` when none is (token
    merging)."""
    h, w = hw
    for k in range(8):
        f = 2**k
        gh, gw = math.ceil(h / f), math.ceil(w / f)
        if gh * gw == n_query:
            return gh, gw
    return None


class Timesteps:
    """The scheduler timestep of each denoiser call, as a float, without a GPU synchronisation per call.

    A timestep taken from ``scheduler.timesteps`` (diffusers' loops iterate over it) is looked up in a host copy of
    that table, made once per ``set_timesteps``: reading a GPU scalar would synchronise with the GPU at every
    denoiser call. Flux pipelines hand the denoiser ``timestep / 1000`` (rounded to the model's dtype): the
    scheduler's entry it stands for is recorded.

    """

    def __init__(self) -> None:
        self._table: tuple[torch.Tensor, list[float]] | None = None  # scheduler.timesteps and its host copy

    def _host(self, table: torch.Tensor) -> list[float]:
        if self._table is None or self._table[0] is not table:
            self._table = (table, table.float().tolist())
        return self._table[1]

    def value(self, timestep, scheduler=None) -> float:
        """The call's timestep as a float (NaN when there is none), looked up in ``scheduler.timesteps``."""
        if not isinstance(timestep, torch.Tensor) or not timestep.numel():
            return first_value(timestep)
        table = getattr(scheduler, "timesteps", None)
        # one entry, or one entry expanded over the batch (CogView4's t.expand(batch): stride 0)
        single = timestep.numel() == 1 or (timestep.ndim == 1 and timestep.stride(0) == 0)
        if (isinstance(table, torch.Tensor) and table.ndim == 1 and single and table.stride(0) == 1
                and timestep.device == table.device
                and timestep.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()):
            i = timestep.storage_offset() - table.storage_offset()
            host = self._host(table)
            if 0 <= i < len(host):
                return host[i]
        value = first_value(timestep)
        if isinstance(table, torch.Tensor) and table.ndim == 1 and table.numel() and 0 <= value <= 1:
            host = self._host(table)
            # the current step's entry when it matches (bf16 rounding can land nearer a neighbouring entry), else the
            # nearest one
            index = getattr(scheduler, "step_index", None)
            index = index if index is not None else (getattr(scheduler, "begin_index", None) or 0)
            if 0 <= index < len(host):
                current = host[index]
                if current == value:  # the entry itself (CogView4's last timestep is 1.0), not a Flux t / 1000
                    return current
                # Flux hands t / 1000; Lumina 2 hands 1 − t / 1000 (it counts from 0 at the noisiest step)
                if any(abs(current - guess) <= 0.01 * max(abs(current), 1.0) for guess in (value * 1000,
                                                                                          (1 - value) * 1000)):
                    return current
            nearest = min(host, key=lambda entry: abs(entry - value * 1000))
            if abs(nearest - value * 1000) <= 0.01 * max(abs(nearest), 1.0):
                return nearest
        return value


def schedule_meta(pipe, latent_hw: tuple[int, int]) -> dict:
    """``store.meta`` entries of a run's schedule and size: ``scheduler`` (class name), ``scheduler_config``,
    ``timesteps`` (the scheduler's last schedule), ``latent_size`` and ``image_size`` (``[h, w]``; the latent grid
    times its autoencoder's down-sampling (``vae`` or Kandinsky 3's ``movq``), or the pipeline's ``vae_scale_factor``
    (``vae_scale_factor_spatial``: Wan; ``vae_spatial_scale_factor``: Mochi 1) where the autoencoder's config does not
    tell; LTX-Video's pipelines: their ``vae_spatial_compression_ratio``)."""
    meta = {}
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None:
        meta["scheduler"] = type(scheduler).__name__
        meta["scheduler_config"] = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        ts = getattr(scheduler, "timesteps", None)
        meta["timesteps"] = [float(t) for t in ts] if ts is not None else None
    h, w = latent_hw
    # the autoencoder's own down-sampling where its config tells (Bria's vae_scale_factor counts its 2×2 packing too),
    # else the pipeline's vae_scale_factor (Sana's DC-AE, Qwen-Image's VAE), vae_scale_factor_spatial (Wan's video
    # VAE) or vae_spatial_scale_factor (Mochi's), else 1 (pixel space: IF)
    coder = getattr(pipe, "vae", None) or getattr(pipe, "movq", None)
    levels = getattr(getattr(coder, "config", None), "block_out_channels", None)
    scale = 2 ** (len(levels) - 1) if levels else int(getattr(pipe, "vae_scale_factor", 0)
                                                       or getattr(pipe, "vae_scale_factor_spatial", 0)  # Wan's
                                                       or getattr(pipe, "vae_spatial_scale_factor", 0) or 1)  # Mochi's
    ratio = getattr(pipe, "vae_spatial_compression_ratio", None)  # LTX-Video's VAE: 4×4 pixel patches, then its levels
    scale = ratio if isinstance(ratio, int) and ratio >= 1 else scale
    meta["latent_size"] = [h, w]
    meta["image_size"] = [h * scale, w * scale]
    return meta
