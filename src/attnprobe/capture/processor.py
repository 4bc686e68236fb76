"""What every recording wrapper shares: the probe's per-call state (``CaptureState``), the capture-time reductions
(``reduce_probs``) and the CPU scratch buffers (``scratch``).

A wrapper (``attnprobe.capture.cross.ProbeProcessor`` and its joint-attention subclass) calls the installed processor
unchanged and computes the site's map beside it; the probe (``attnprobe.capture.recorder``) sets the state once per
denoiser call and collects the maps the wrappers leave in ``state.outbox``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ProbeError

__all__ = ["check_keys", "CaptureState", "PendingLogits", "reduce_probs", "scratch", "lasting", "batch_rows", "softmax2",
           "LOG2E", "LN2"]


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


#: log2(e): base-2 logits ``q·kᵀ·scale·log2(e)`` give ``softmax(q·kᵀ·scale) = 2^l / Σ 2^l``
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: the rows whose sum of ``2^l`` lies in [2^-20, 2^120) need no maximum subtracted: no term overflows, ``1/sum`` is a
#: normal float (a flush-to-zero CPU setting would zero a subnormal one), and every term at least 2^-99 of its row's
#: sum is a normal float, as exact as with the maximum subtracted; the other rows (a logit above about 120, 83 in
#: natural units, or every logit below about -20, -14 natural) are taken by ``torch.softmax``
_SAFE_SUM = (2.0 ** -20, 2.0 ** 120)


def softmax2(logits2: torch.Tensor, workspace: dict, redo=None) -> torch.Tensor:
    """``softmax`` over the last axis of base-2 logits (``LOG2E`` folded into the scale), in the workspace's
    scratch buffers (CPU). ``torch.exp2`` is about 4× faster than ``torch.exp`` on x86 CPUs (measured: 0.13 against
    0.57 ns a value, one core), and ``torch.softmax`` runs at ``exp``'s speed; so: ``e = 2^l``, ``s = Σ e``,
    ``p = e · (1/s)``, without the row maximum. A row whose sum leaves ``_SAFE_SUM`` (a logit above about 120, or
    every logit below about -20, base 2) is taken by ``torch.softmax`` of its natural logits instead, row by row, so
    a row's values never depend on the other rows in the buffer (other sites, in ``PendingLogits``).

    ``redo``: ``None`` to keep ``logits2`` and compute in a scratch buffer; or a function that writes the logits into
    ``logits2`` again, and then ``p`` is computed in place (half the memory a large site's map goes through) and the
    rare recomputation calls it.

    Returns ``p`` (``logits2`` itself or a scratch buffer of its shape), each row summing to 1 up to fp32 rounding:
    ``torch.softmax``'s probabilities within a few fp32 ulps, for every probability at least 2^-99 of 1 (smaller ones
    may be less exact or 0; they are below every store dtype's resolution but float32's and float64's)."""
    shape = logits2.shape
    e = torch.exp2(logits2, out=logits2 if redo is not None else scratch(workspace, "exp2", shape, logits2.device))
    s = torch.sum(e, -1, keepdim=True, out=scratch(workspace, "sum", (*shape[:-1], 1), logits2.device))
    low, high = torch.aminmax(s)
    if float(low) >= _SAFE_SUM[0] and float(high) < _SAFE_SUM[1]:  # NaN fails too
        return e.mul_(s.reciprocal_())
    flat = s.view(-1)
    bad = ((flat >= _SAFE_SUM[0]) & (flat < _SAFE_SUM[1])).logical_not_().nonzero().view(-1)
    if redo is not None:  # the logits again, and the same exponentials for the other rows
        redo()
    natural = logits2.reshape(-1, shape[-1]).index_select(0, bad).mul_(LN2)
    if redo is not None:
        torch.exp2(logits2, out=e)
        torch.sum(e, -1, keepdim=True, out=s)
    e.mul_(s.reciprocal_())
    e.view(-1, shape[-1]).index_copy_(0, bad, torch.softmax(natural, -1))
    return e


def _version(tensor: torch.Tensor) -> int:
    """The in-place edits of a tensor so far (-1 for an inference tensor, which keeps no count: ``defer`` keeps a
    copy of those)."""
    return -1 if tensor.is_inference() else tensor._version


def _blocks(flat: torch.Tensor, sizes: list, kept_heads: int | None = None) -> list:
    """``flat`` ``[row, x]`` (``PendingLogits``' buffer: the groups one after the other) as one view per group,
    ``[site, sample, head, query, x]``; ``sizes``: per group ``(sites, samples, heads, queries)``, of which
    ``kept_heads`` (1 after the head mean) replaces the heads."""
    views, at = [], 0
    for n, samples, n_heads, n_query in sizes:
        rows = n * samples * (n_heads if kept_heads is None else kept_heads) * n_query
        views.append(flat[at:at + rows].view(n, samples, -1, n_query, flat.shape[-1]))
        at += rows
    return views


class PendingLogits:
    """The small cross-attention sites of the denoiser call in progress, computed together at its end (CPU,
    outside ``torch.compile``).

    A small site only leaves its query and key (``defer``); ``finish`` takes every deferred site's logits into one
    fp32 buffer per text length (a batched product per shape), then the base-2 softmax (``softmax2``), the token
    selection and the cast once for all of them, and the head mean once per shape: each torch op costs 2–15 µs to
    dispatch on a CPU, more than the arithmetic of a small site, so the work no longer grows with the number of sites.
    A large site computes its map at once in reused scratch buffers instead: its cost is the arithmetic, and buffers
    that stay in the CPU's cache beat a call's worth of logits that would push the model's own tensors out of it
    (``takes``). The values are those of the per-site path (``cross.attention_probs``, then ``reduce_probs``) up to
    fp32 rounding, not bit for bit: ``exp2`` rounds the last values of a buffer by another code path than the rest.
    So every call of a site takes the same path (the verify-once call included), and a site's maps do not depend on
    which call was its first (tested)."""

    #: the largest site map (samples × heads × queries × tokens) taken at the call's end: 64 Ki values, 256 KiB of
    #: fp32 (SD 1.5 at 512 px: the 8×8 and 16×16 sites; the 32×32 and 64×64 ones at once)
    LARGEST = 64 * 1024

    def __init__(self) -> None:
        #: (query shape, key shape, heads, scale, dtypes) -> [(site, query, key, their versions, check)], in call order
        self.groups: dict[tuple, list] = {}
        self.rows: Any = None  # the recorded rows of the deferred sites (one per denoiser call)
        self.buffers: dict[tuple, torch.Tensor] = {}  # reused fp32 buffers, grown to the largest call
        self._small: dict[tuple, bool] = {}  # (group key, rows) -> takes()

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

    def defer(self, site: str, attn, query: torch.Tensor, key: torch.Tensor, rows, check=None) -> bool:
        """Leave a small site's ``attn.to_q`` and ``attn.to_k`` outputs (``[batch, query | token, (head d)]``) for
        ``finish``; ``False`` (nothing left) for a large site or batch rows given as indices. The caller has checked
        that the site has no ``norm_q``/``norm_k`` and no attention mask. ``check``: ``None``, or a function that
        ``finish`` hands the site's probabilities ``[sample, head, query, token]`` before any reduction (the
        verify-once check): every call of a site then goes through the same arithmetic, so its maps do not depend
        on which call was its first (``exp2`` rounds the tail of a buffer differently)."""
        if not (rows is None or isinstance(rows, slice)):
            return False
        group = (query.shape, key.shape, attn.heads, attn.scale, query.dtype, key.dtype)
        spec = (group, None if rows is None else (rows.start, rows.stop, rows.step))
        small = self._small.get(spec)
        if small is None:
            small = self._small[spec] = self.takes(query, key, attn.heads, rows)
        if not small:
            return False
        if self.rows is not rows and any(self.groups.values()):
            raise ProbeError(f"site {site}: the recorded batch rows changed inside a denoiser call")
        self.rows = rows
        if query.is_inference():  # no version count to see an edit in place by: a copy, as it is now
            query, key = query.clone(), key.clone()
        self.groups.setdefault(group, []).append((site, query, key, _version(query), _version(key), check))
        return True

    def _buffer(self, name: tuple, shape, device) -> torch.Tensor:
        """``shape`` of a reused fp32 buffer (a view of its first values), grown when a call needs more."""
        size = 1
        for n in shape:
            size *= n
        buffer = self.buffers.get((name, device))
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[(name, device)] = lasting((size,), device)
        return buffer[:size].view(shape)

    def finish(self, heads: str, tokens: torch.Tensor | None, dtype: torch.dtype, workspace: dict) -> list:
        """``(site, probs)`` of every site deferred since the last ``finish``: ``probs`` ``[sample, head or 1,
        query, kept token]`` in ``dtype`` (as ``reduce_probs``), fresh tensors (views of one per text length).

        Raises:
            ProbeError: a deferred query or key was changed in place before the call's end."""
        by_keys: dict[int, list] = {}
        for group, entries in self.groups.items():
            if entries:
                by_keys.setdefault(group[1][1], []).append((group, entries))
        done = []
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():  # pipelines run without grad
            for n_keys, plan in by_keys.items():
                done += self._finish_keys(n_keys, plan, heads, tokens, dtype, workspace)
        self.drop()
        return done

    def _finish_keys(self, n_keys: int, plan: list, heads: str, tokens, dtype, workspace) -> list:
        """The deferred sites of one text length: their logits as consecutive blocks ``[site·sample·head, query,
        token]`` of one buffer, so that the softmax, token selection and cast are one op each."""
        rows = self.rows
        sizes = []  # per group: (sites, samples, heads, queries)
        for (q_shape, _, n_heads, *_), entries in plan:
            samples = q_shape[0] if rows is None else len(range(*rows.indices(q_shape[0])))
            sizes.append((len(entries), samples, n_heads, q_shape[1]))
        total = sum(n * s * h * q for n, s, h, q in sizes)
        device = plan[0][1][0][1].device
        logits = self._buffer(("logits", n_keys), (total, n_keys), device)
        start, products = 0, []
        for ((q_shape, _, n_heads, scale, *_), entries), (n, samples, _, n_query) in zip(plan, sizes):
            for site, query, key, q_version, k_version, _ in entries:
                if _version(query) != q_version or _version(key) != k_version:
                    raise ProbeError(f"site {site}: its query or key was changed in place after its processor ran")
            query = torch.stack([e[1] for e in entries])  # [site, batch, query, (head d)]
            key = torch.stack([e[2] for e in entries])
            if rows is not None:
                query, key = query[:, rows], key[:, rows]
            # [site·sample·head, query, d] × [site·sample·head, d, token], LOG2E folded into the scale
            q = query.float().unflatten(-1, (n_heads, -1)).transpose(2, 3).reshape(n * samples * n_heads, n_query, -1)
            k = key.float().unflatten(-1, (n_heads, -1)).permute(0, 1, 3, 4, 2).reshape(n * samples * n_heads, -1, n_keys)
            products.append((logits[start:start + n * samples * n_heads * n_query].view(-1, n_query, n_keys), q, k,
                             scale * LOG2E))
            start += n * samples * n_heads * n_query

        def fill():
            for block, q, k, alpha in products:
                torch.baddbmm(block, q, k, beta=0, alpha=alpha, out=block)

        fill()
        probs = softmax2(logits, workspace, redo=fill)  # [rows, token], in place: half the memory to go through
        for (_, entries), full in zip(plan, _blocks(probs, sizes)):
            if any(entry[-1] is not None for entry in entries):  # the verify-once checks
                for entry, site_probs in zip(entries, full.unbind(0)):
                    if entry[-1] is not None:
                        entry[-1](site_probs)
        if tokens is not None:
            probs = torch.index_select(probs, -1, tokens, out=scratch(workspace, "tokens", (total, tokens.numel()),
                                                                     probs.device))
        if heads == "mean":
            mean = self._buffer(("mean", probs.shape[1]), (sum(n * s * q for n, s, _, q in sizes), probs.shape[1]),
                                device)
            for block, out in zip(_blocks(probs, sizes), _blocks(mean, sizes, kept_heads=1)):
                torch.mean(block, dim=2, keepdim=True, out=out)
            probs = mean
        kept = _blocks(probs.to(dtype, copy=True), sizes, kept_heads=1 if heads == "mean" else None)
        return [done for (_, entries), block in zip(plan, kept) for done in zip([e[0] for e in entries], block.unbind(0))]

    def drop(self) -> None:
        """Forget the sites of the call in progress (the buffers stay, sized for the next call)."""
        for entries in self.groups.values():
            entries.clear()
        self.rows = None


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
        pending: the small cross-attention sites of the call in progress (their q and k), whose maps the probe
            computes together at its end (``PendingLogits``; CPU, outside ``torch.compile``).
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
