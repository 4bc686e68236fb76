"""The recording wrapper around a site's installed attention processor.

The wrapper calls the installed processor unchanged (its output is the site's output, so images stay
bit-identical) and, in a side branch, recomputes the attention probabilities from the module's own query
and key: the outputs of ``attn.to_q`` and ``attn.to_k`` (or the key half of ``attn.to_kv`` for fused
projections), captured by forward hooks while the processor runs, then ``attn.norm_q`` / ``attn.norm_k``,
``attn.scale`` and the prepared attention mask, exactly as diffusers' processors use them::

    p = softmax(q · kᵀ · attn.scale + mask)      # [sample, head, query, token], fp32, sums to 1 over token
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange

from .errors import ProbeError

__all__ = ["ProbeProcessor", "CaptureState", "wrap_processor", "attention_probs", "reduce_probs"]


def _buffer(workspace: dict | None, name: str, shape, device) -> torch.Tensor | None:
    """A reusable fp32 scratch tensor (CPU only): fresh multi-MB temporaries at every site call make glibc map and
    unmap memory, and the page faults cost more than the arithmetic. ``None`` without a workspace."""
    if workspace is None:
        return None
    key = (name, tuple(shape), device)
    if key not in workspace:
        workspace[key] = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    return workspace[key]


def attention_probs(
    attn, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, rows=None,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Cross-attention probabilities of one site call, computed in fp32.

    Args:
        attn: the diffusers ``Attention`` module.
        query: ``attn.to_q`` output, ``[batch, query, heads * head_dim]``.
        key: ``attn.to_k`` output, ``[batch, token, heads * head_dim]``.
        attention_mask: the mask the processor got (additive bias or boolean), or ``None``.
        rows: batch rows to keep (the captured passes): a ``slice``, a long tensor of indices, or ``None`` for all.
        workspace: a dict of scratch buffers to compute in (reused between calls); the result is then one of
            them, valid until the next call with the same workspace. Default: ``None`` (fresh tensors).

    Returns:
        ``[sample, head, query, token]`` float32 probabilities; each row sums to 1 over ``token``.
    """
    batch, n_keys, heads = query.shape[0], key.shape[1], attn.heads
    if isinstance(rows, slice):  # a view: no copy of q and k
        query, key = query[rows], key[rows]
    elif rows is not None:
        query, key = query.index_select(0, rows), key.index_select(0, rows)
    query = rearrange(query, "sample query (head d) -> sample head query d", head=heads)
    key = rearrange(key, "sample token (head d) -> sample head token d", head=heads)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    # the scale goes on q ([query, d]) rather than on the logits ([query, token]): fewer multiplications
    query, key_t = query.float() * attn.scale, key.float().transpose(-1, -2)
    shape = (*query.shape[:-1], key_t.shape[-1])
    logits = torch.matmul(query, key_t, out=_buffer(workspace, "logits", shape, query.device))
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, n_keys, batch)
        mask = mask.reshape(batch, heads, -1, mask.shape[-1])
        if isinstance(rows, slice):
            mask = mask[rows]
        elif rows is not None:
            mask = mask.index_select(0, rows)
        if mask.dtype == torch.bool:
            logits = logits.masked_fill_(~mask, float("-inf"))
        else:
            logits = logits.add_(mask.float())
    if workspace is None:
        return logits.softmax(dim=-1)
    return torch.ops.aten._softmax.out(logits, -1, False, out=_buffer(workspace, "probs", shape, logits.device))


def reduce_probs(probs: torch.Tensor, heads: str, tokens: torch.Tensor | None, workspace: dict | None = None) -> torch.Tensor:
    """The capture-time reductions of ``probe``: keep token positions, then average heads.

    ``probs``: ``[sample, head, query, token]`` → ``[sample, head or 1, query, kept token]``. Selected tokens no
    longer sum to 1 (they hold their share of the full softmax). ``workspace``: as for ``attention_probs``.
    """
    if tokens is not None:
        shape = (*probs.shape[:-1], tokens.numel())
        probs = torch.index_select(probs, -1, tokens, out=_buffer(workspace, "tokens", shape, probs.device))
    if heads == "mean":
        shape = (probs.shape[0], 1, *probs.shape[2:])
        probs = torch.mean(probs, dim=1, keepdim=True, out=_buffer(workspace, "mean", shape, probs.device))
    return probs


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
    """

    keep: bool = False
    rows: Any = None
    heads: str = "keep"
    tokens: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32
    outbox: list = field(default_factory=list)
    workspace: dict = field(default_factory=dict)
    joint: str = "exact"
    text_len: int = 0
    shares: list = field(default_factory=list)


class ProbeProcessor:
    """Wraps one site's processor: the original computes the output, the wrapper records the probabilities.

    Built by ``wrap_processor``; ``inner`` is the wrapped processor, restored by the probe on exit. The
    probabilities (``attention_probs``, then ``reduce_probs``) are computed inside the denoiser's forward, so a
    compiled denoiser traces them, and go to ``state.outbox`` for the probe to collect.
    """

    def __init__(self, inner: Any, site: str, attn, state: CaptureState) -> None:
        self.inner = inner
        self.site = site
        self.state = state
        self._armed = False
        self._removed = False
        self._query: torch.Tensor | None = None
        self._key: torch.Tensor | None = None
        self._hooks = []
        fused = bool(getattr(attn, "fused_projections", False)) and getattr(attn, "to_kv", None) is not None
        if getattr(attn, "to_q", None) is None or (getattr(attn, "to_k", None) is None and not fused):
            raise ProbeError(f"site {site}: the attention module has no to_q/to_k projection to read q and k from")
        self._hooks.append(attn.to_q.register_forward_hook(self._take_query))
        self._hooks.append((attn.to_kv if fused else attn.to_k).register_forward_hook(self._take_key_fused if fused else self._take_key))

    def __getattr__(self, name):
        """Attributes the wrapper lacks are ``inner``'s (diffusers reads e.g. ``processor._attention_backend``)."""
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    # set on the processor by diffusers' ``set_attention_backend`` / context parallelism: they belong to ``inner``,
    # which computes the output
    _attention_backend = property(lambda self: getattr(self.inner, "_attention_backend", None),
                                  lambda self, value: setattr(self.inner, "_attention_backend", value))
    _parallel_config = property(lambda self: getattr(self.inner, "_parallel_config", None),
                                lambda self, value: setattr(self.inner, "_parallel_config", value))

    def _take_query(self, module, args, output):
        if self._armed and self._query is None:
            self._query = output

    def _take_key(self, module, args, output):
        if self._armed and self._key is None:
            self._key = output

    def _take_key_fused(self, module, args, output):
        if self._armed and self._key is None:
            self._key = output.chunk(2, dim=-1)[0]

    def remove_hooks(self) -> None:
        """Detach from the module; from now on the wrapper only forwards to ``inner`` (diffusers may have kept a
        reference, e.g. ``fuse_qkv_projections`` saves the processors it replaces and ``unfuse`` restores them)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._removed = True

    def __call__(self, attn, hidden_states, *args, **kwargs):
        state = self.state
        if self._removed or not state.keep:
            return self.inner(attn, hidden_states, *args, **kwargs)
        self._query = self._key = None
        self._armed = True
        try:
            output = self.inner(attn, hidden_states, *args, **kwargs)
        finally:
            self._armed = False
        query, key = self._query, self._key
        self._query = self._key = None
        if query is None or key is None:
            raise ProbeError(
                f"site {self.site}: the installed processor {type(self.inner).__name__} did not call "
                f"attn.{'to_q' if query is None else 'to_k'}, so attnprobe cannot read its "
                f"{'query' if query is None else 'key'}. Processors that compute q/k another way are not supported."
            )
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        scratch = state.workspace if query.device.type == "cpu" and not torch.compiler.is_compiling() else None
        with torch.no_grad():
            probs = attention_probs(attn, query, key, mask, state.rows, scratch)
            probs = reduce_probs(probs, state.heads, state.tokens, scratch)
            probs = probs.to(state.dtype, copy=scratch is not None)  # never hand on a scratch buffer
        state.outbox.append((self.site, probs))
        return output

    def __repr__(self) -> str:
        return f"ProbeProcessor(site={self.site!r}, inner={self.inner!r})"


def wrap_processor(inner: Any, site: str, attn, state: CaptureState, kind: str = "cross") -> ProbeProcessor:
    """A ``ProbeProcessor`` (``kind="cross"``) or ``joint.JointProbeProcessor`` (``"joint"``, ``"single"``) whose
    ``__call__`` shows ``inner``'s signature.

    ``Attention.forward`` drops every ``cross_attention_kwargs`` entry that its processor's ``__call__`` does
    not name (e.g. IP-Adapter's ``ip_adapter_masks``), so the wrapper must name exactly what ``inner`` names.
    """
    if kind == "cross":
        return _wrapper_class(inner, ProbeProcessor)(inner, site, attn, state)
    from .joint import JointProbeProcessor

    return _wrapper_class(inner, JointProbeProcessor)(inner, site, attn, state, kind)


_CLASSES: dict = {}


def _wrapper_class(inner: Any, base: type) -> type:
    """One wrapper class per signature of the wrapped processors (cached), so that every site of a model, and
    every probe opened on it, has the same processor type: ``torch.compile`` guards on the processor's type and
    would recompile ``Attention.forward`` for each new class."""
    sig = inspect.signature(inner.__call__ if not inspect.isfunction(inner) else inner)
    key = (base.__name__, type(inner).__name__, tuple((p.name, p.kind, repr(p.default)) for p in sig.parameters.values()))
    if key not in _CLASSES:
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *sig.parameters.values()]

        def __call__(self, *args, **kwargs):
            return base.__call__(self, *args, **kwargs)

        __call__.__signature__ = inspect.Signature(params)
        _CLASSES[key] = type(f"Probe{type(inner).__name__}", (base,), {"__call__": __call__})
    return _CLASSES[key]
