"""What every recording wrapper shares: the probe's per-call state (``CaptureState``), the capture-time reductions
(``reduce_probs``) and the CPU scratch buffers (``scratch``).

A wrapper (``attnprobe.capture.cross.ProbeProcessor`` and its joint-attention subclass) calls the installed processor
unchanged and computes the site's map beside it; the probe (``attnprobe.capture.recorder``) sets the state once per
denoiser call and collects the maps the wrappers leave in ``state.outbox``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ProbeError

__all__ = ["check_keys", "CaptureState", "PendingLogits", "reduce_probs", "scratch", "lasting", "batch_rows"]


def scratch(workspace: dict | None, name: str, shape, device) -> torch.Tensor | None:
    """A reusable fp32 scratch tensor (CPU only): fresh multi-MB temporaries at every site call make glibc map and
    unmap memory, and the page faults cost more than the arithmetic. ``None`` without a workspace."""
    if workspace is None:
        return None
    key = (name, tuple(shape), device)
    if key not in workspace:
        workspace[key] = lasting(tuple(shape), device)
    return workspace[key]


def lasting(shape, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty tensor that later calls may write into, whatever the grad mode: made outside ``torch.inference_mode``
    (an inference tensor cannot be written into outside it, and a probe may see pipeline calls of both kinds)."""
    with torch.inference_mode(False):
        return torch.empty(shape, dtype=dtype, device=device)


def batch_rows(x: torch.Tensor, rows) -> torch.Tensor:
    """The recorded batch rows of ``x`` (``CaptureState.rows``: a ``slice``, a long tensor of indices, or ``None``
    for all); a slice gives a view, no copy."""
    if rows is None:
        return x
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows.to(x.device))


def reduce_probs(probs: torch.Tensor, heads: str, tokens: torch.Tensor | None, workspace: dict | None = None) -> torch.Tensor:
    """The capture-time reductions of ``probe``: keep token positions, then average heads.

    ``probs``: ``[sample, head, query, token]`` → ``[sample, head or 1, query, kept token]``. Selected tokens no
    longer sum to 1 (they hold their share of the full softmax). ``workspace``: as for ``attention_probs``.
    """
    if tokens is not None:
        shape = (*probs.shape[:-1], tokens.numel())
        probs = torch.index_select(probs, -1, tokens, out=scratch(workspace, "tokens", shape, probs.device))
    if heads == "mean":
        shape = (probs.shape[0], 1, *probs.shape[2:])
        probs = torch.mean(probs, dim=1, keepdim=True, out=scratch(workspace, "mean", shape, probs.device))
    return probs


class PendingLogits:
    """The cross-attention logits of the small sites of the denoiser call in progress, one fp32 buffer per shape
    ``[sample, head, query, token]``: those sites write their ``q · kᵀ · scale + mask`` into slots, and ``finish``
    takes the softmax, the capture-time reductions and the cast once per shape and call, not once per site (each
    torch op costs 5–15 µs to dispatch on a CPU, more than the arithmetic of a small site). A large site computes
    its map at once in reused scratch buffers instead: its cost is the arithmetic, and buffers that stay in the
    CPU's cache beat a call's worth of logits that would push the model's own tensors out of it (``takes``). Used on
    the CPU outside ``torch.compile``. The values are those of the per-site path: the softmax is row by row and the
    head mean element by element."""

    #: the largest site map (samples × heads × queries × tokens) taken at the call's end: 64 Ki values, 256 KiB of
    #: fp32 (SD 1.5 at 512 px: the 8×8 and 16×16 sites; the 32×32 and 64×64 ones at once)
    LARGEST = 64 * 1024

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}  # shape -> [capacity, *shape]
        self.slots: dict[tuple, tuple] = {}  # shape -> its buffer's slots (views, made once: indexing costs ~1 µs)
        self.sites: dict[tuple, list[str]] = {}  # shape -> the sites of the call in progress, in slot order

    def takes(self, query: torch.Tensor, key: torch.Tensor, heads: int, rows) -> bool:
        """Whether a site call of ``query`` ``[batch, query, (head d)]`` and ``key`` ``[batch, token, (head d)]``
        recording batch ``rows`` (``CaptureState.rows``) is small enough to wait for the call's end."""
        batch = query.shape[0]
        if rows is None:
            samples = batch
        elif isinstance(rows, slice):  # CaptureState's are slice(first, last + 1)
            samples = len(range(*rows.indices(batch))) if rows.step is not None or rows.stop is None else (
                min(rows.stop, batch) - (rows.start or 0))
        else:
            samples = rows.numel()
        return samples * heads * query.shape[1] * key.shape[1] <= self.LARGEST

    def slot(self, site: str, shape, device: torch.device) -> torch.Tensor:
        """The next free ``shape`` buffer of the call in progress, for ``site``."""
        shape = tuple(shape)
        sites = self.sites.setdefault(shape, [])
        buffer = self.buffers.get(shape)
        if buffer is None or buffer.device != device or len(sites) == buffer.shape[0]:
            grown = lasting((2 * len(sites) or 1, *shape), device)
            if sites:  # the first call finds how many sites share a shape; the buffer keeps that size after
                grown[: len(sites)].copy_(buffer[: len(sites)])
            self.buffers[shape] = grown
            self.slots[shape] = grown.unbind(0)
        sites.append(site)
        return self.slots[shape][len(sites) - 1]

    def finish(self, heads: str, tokens: torch.Tensor | None, dtype: torch.dtype, workspace: dict) -> list:
        """``(site, probs)`` of every slot written since the last ``finish``: ``probs`` ``[sample, head or 1, query,
        kept token]`` in ``dtype`` (as ``reduce_probs``), fresh tensors (views of one per shape)."""
        done = []
        for shape, sites in self.sites.items():
            if not sites:
                continue
            logits = self.buffers[shape][: len(sites)]
            probs = torch.ops.aten._softmax.out(logits, -1, False, out=scratch(workspace, "pending", logits.shape,
                                                                               logits.device))
            probs = reduce_probs(probs.flatten(0, 1), heads, tokens, workspace).to(dtype, copy=True)
            done += zip(sites, probs.unflatten(0, (len(sites), -1)).unbind(0))
        self.drop()
        return done

    def drop(self) -> None:
        """Forget the slots of the call in progress (the buffers stay, sized for the next call)."""
        for sites in self.sites.values():
            sites.clear()


@dataclass
class CaptureState:
    """What every wrapper of one probe reads at each site call; the probe updates it once per denoiser call.

    Only bools, constant strings, tensors and slices that change when the batch layout changes:
    ``torch.compile`` guards on these values, so nothing here may take a new value at every call.

    Attributes:
        keep: record this denoiser call (``probe(calls=...)``); ``False`` before the first denoiser call.
        rows: batch rows of the captured passes (a ``slice`` when contiguous, else a long tensor), or ``None``.
        heads: ``"keep"`` or ``"mean"``.
        tokens: token positions to keep (long tensor) or ``None`` for all.
        dtype: the dtype of the maps handed to the probe (the store's, or fp32 for a running aggregate).
        workspace: scratch buffers for computing on the CPU outside ``torch.compile`` (see ``attention_probs``).
        outbox: ``(site, probs)`` of the call in progress, appended by the wrappers and emptied by the probe at
            the end of each denoiser call (a list append traces without a graph break; a call back into the
            probe's Python state would break the graph at every site).
        joint: ``"exact"`` or ``"renorm"``: the map of joint-attention sites (``attnprobe.joint``).
        text_len: text tokens of the denoiser call in progress (for Flux's single-stream sites; fixed for a
            pipeline and ``max_sequence_length``, so it does not make a compiled denoiser recompile per call).
        shares: ``(site, [sample, head])`` mean text share of each joint site of the call in progress.
        checks: ``(site, processor class, relative error or None, tolerance, conditioning)`` of the sites verified
            in the call in progress (once per site: ``cross.output_error``; ``conditioning``: whether the site got the
            denoiser's own ``encoder_hidden_states``, ``None`` where not compared).
        n_keys: the text positions the denoiser was called with, which the token labels describe; a site with
            another number of text keys (a denoiser that adds keys of its own) cannot be labelled. 0: not known.
        row_text: per batch row, the text positions a denoiser that joins each row's attended text with the image
            joins (Lumina 2: the ``encoder_attention_mask`` count; Z-Image: its caption's length), else ``None``.
        row_mask: a denoiser whose processor calls the kernel once per batch row over that row's attended text
            (``Family.row_calls``: Mochi 1): its ``encoder_attention_mask`` as booleans ``[batch, text]``, else ``None``.
        text_order: a denoiser that reorders each row's keys after the image by its masks (``Family.text_order``:
            HunyuanVideo 1.5): ``(text [batch, n_keys], added [batch, A])`` positions among those keys, else ``None``.
        pad_to, image_len: a denoiser that pads its image positions (to a multiple of ``pad_to``: Z-Image; HiDream):
            the family's ``pad_to``, and the image positions of the call in progress (the family's ``image_len``).
        extra_keys: keys the denoiser puts before the text keys in every joint sequence (AuraFlow's register tokens:
            the family's ``registers``); they share the softmax but are not text (``attnprobe.capture.kernel``).
        keys_after: keys the denoiser puts right after the text keys in the call in progress (Stable Cascade's pooled
            text and image embedding: the family's ``keys_after``); they share the softmax but are not text.
        states: the denoiser call's ``encoder_hidden_states`` where its cross sites receive them unchanged (UNets),
            for the once-per-site check that no hook or processor changed them on the way; else ``None``.
        pending: the cross-attention logits of the call in progress whose softmax the probe takes at its end
            (``PendingLogits``; CPU, outside ``torch.compile``).
        relate: the probe's ``relations.Relations`` (``probe(relations=...)``), else ``None``.
    """

    keep: bool = False
    rows: Any = None
    heads: str = "keep"
    tokens: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32
    states: Any = None
    n_keys: int = 0
    extra_keys: int = 0
    keys_after: int = 0
    row_text: Any = None
    row_mask: Any = None
    text_order: Any = None
    pad_to: int = 0
    image_len: int = 0
    outbox: list = field(default_factory=list)
    workspace: dict = field(default_factory=dict)
    pending: PendingLogits = field(default_factory=PendingLogits)
    joint: str = "exact"
    text_len: int = 0
    shares: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    relate: Any = None


def check_keys(state: CaptureState, site: str, n_keys: int) -> None:
    """Raise unless a site's text keys are the positions the token labels describe (``state.n_keys``).

    Raises:
        ProbeError: the site attends to another number of text keys than the denoiser was given (AuraFlow adds
            register tokens before the text): labelling them from the prompt's positions would be silently wrong.
    """
    if state.n_keys and n_keys != state.n_keys:
        raise ProbeError(
            f"site {site} attends to {n_keys} text keys, but the denoiser was called with {state.n_keys} text "
            "positions: the denoiser adds keys of its own (register tokens?) or drops some, so attnprobe cannot say "
            "which key is which token. Its family is not supported yet (docs/pipelines.md)"
        )
