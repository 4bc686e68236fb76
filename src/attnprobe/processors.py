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
from typing import Any, Callable

import torch
from einops import rearrange

from .errors import ProbeError

__all__ = ["ProbeProcessor", "wrap_processor", "attention_probs"]


def attention_probs(
    attn, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor | None
) -> torch.Tensor:
    """Cross-attention probabilities of one site call, computed in fp32.

    Args:
        attn: the diffusers ``Attention`` module.
        query: ``attn.to_q`` output, ``[batch, query, heads * head_dim]``.
        key: ``attn.to_k`` output, ``[batch, token, heads * head_dim]``.
        attention_mask: the mask the processor got (additive bias or boolean), or ``None``.
        rows: batch rows to keep (the captured passes), or ``None`` for all.

    Returns:
        ``[sample, head, query, token]`` float32 probabilities; each row sums to 1 over ``token``.
    """
    batch, n_keys, heads = query.shape[0], key.shape[1], attn.heads
    if rows is not None:
        query, key = query.index_select(0, rows), key.index_select(0, rows)
    query = rearrange(query, "sample query (head d) -> sample head query d", head=heads)
    key = rearrange(key, "sample token (head d) -> sample head token d", head=heads)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, n_keys, batch)
        mask = mask.reshape(batch, heads, -1, mask.shape[-1])
        if rows is not None:
            mask = mask.index_select(0, rows)
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    return logits.softmax(dim=-1)


class ProbeProcessor:
    """Wraps one site's processor: the original computes the output, the wrapper records the probabilities.

    Built by ``wrap_processor``; ``inner`` is the wrapped processor, restored by the probe on exit.
    """

    def __init__(self, inner: Any, site: str, on_probs: Callable, attn) -> None:
        self.inner = inner
        self.site = site
        self._on_probs = on_probs
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
        if self._removed:
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
        self._on_probs(self.site, attn, query, key, mask)
        return output

    def __repr__(self) -> str:
        return f"ProbeProcessor(site={self.site!r}, inner={self.inner!r})"


def wrap_processor(inner: Any, site: str, on_probs: Callable, attn) -> ProbeProcessor:
    """A ``ProbeProcessor`` whose ``__call__`` shows ``inner``'s signature.

    ``Attention.forward`` drops every ``cross_attention_kwargs`` entry that its processor's ``__call__`` does
    not name (e.g. IP-Adapter's ``ip_adapter_masks``), so the wrapper must name exactly what ``inner`` names.
    """
    sig = inspect.signature(inner.__call__ if not inspect.isfunction(inner) else inner)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *sig.parameters.values()]

    def __call__(self, *args, **kwargs):
        return ProbeProcessor.__call__(self, *args, **kwargs)

    __call__.__signature__ = inspect.Signature(params)
    cls = type(f"Probe{type(inner).__name__}", (ProbeProcessor,), {"__call__": __call__})
    return cls(inner, site, on_probs, attn)
