"""Cross-attention sites: the recording wrapper (``ProbeProcessor``) and ``attention_probs``.

The wrapper calls the installed processor unchanged (its output is the site's output, so images stay
bit-identical) and, in a side branch, recomputes the attention probabilities from the module's own query
and key: the outputs of ``attn.to_q`` and ``attn.to_k`` (or the key half of ``attn.to_kv`` for fused
projections), captured by forward hooks while the processor runs, then ``attn.norm_q`` / ``attn.norm_k``,
``attn.scale`` and the prepared attention mask, exactly as diffusers' processors use them::

    p = softmax(q · kᵀ · attn.scale + mask)      # [sample, head, query, token], fp32, sums to 1 over token
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ..errors import ProbeError
from .processor import LOG2E, CaptureState, batch_rows, check_keys, reduce_probs, scratch, softmax2

__all__ = ["ProbeProcessor", "attention_probs", "attention_logits", "output_error", "TOLERANCE", "chain", "keep_first", "to_out_hook", "with_tolerance"]

#: the largest relative error ``output_error`` accepts, by the dtype the processor computed in: fp32 SDPA's and
#: matmul's rounding differ by ~1e-6; half precision rounds each product (measured on the tiny pipelines: fp16
#: 2e-4, bf16 2e-3, so a margin for longer sequences and fused GPU kernels); fp64 as fp32, as the probe's own
#: probabilities are fp32 (a float64 pipeline's check measured 1.5e-7). An edit smaller than the tolerance
#: (a reweighting by a few percent in bf16) passes unseen.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: for any other dtype (fp8)
HALF_TOLERANCE = 5e-2


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
    if workspace is None:
        return attention_logits(attn, query, key, attention_mask, rows).softmax(dim=-1)
    # on the CPU, base-2 logits and exp2 (processor.softmax2): the same probabilities, the exponentials 4× cheaper
    def logits():
        return attention_logits(attn, query, key, attention_mask, rows,
                                lambda shape: scratch(workspace, "logits", shape, query.device), base2=True)

    return softmax2(logits(), workspace, redo=logits)


def attention_logits(attn, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, rows=None,
                     out=None, base2: bool = False) -> torch.Tensor:
    """``q · kᵀ · attn.scale + mask`` of one site call in fp32, ``[sample, head, query, token]``: what
    ``attention_probs`` takes the softmax of (arguments as there). ``out``: ``shape -> tensor`` giving the buffer to
    write into (a scratch buffer), or ``None`` for a fresh tensor. ``base2``: times ``log2(e)``, for
    ``processor.softmax2``."""
    batch, n_keys, heads = query.shape[0], key.shape[1], attn.heads
    if isinstance(rows, slice):  # a view: no copy of q and k
        query, key = query[rows], key[rows]
    elif rows is not None:
        query, key = query.index_select(0, rows), key.index_select(0, rows)
    # [sample, position, (head d)] -> [sample, position, head, d] (a view), normalised over d as the processor does
    samples, n_query = query.shape[:2]
    query, key = query.reshape(samples, n_query, heads, -1), key.reshape(samples, n_keys, heads, -1)
    norm_q, norm_k = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    # one batched product over (sample, head), the scale applied by it: [sample·head, query, d] × [sample·head, d,
    # token] (a copy only for several samples); ~4 µs a site call less than matmul on 4-D views and a scaled q
    q = query.float().transpose(1, 2).reshape(samples * heads, n_query, -1)
    k = key.float().permute(0, 2, 3, 1).reshape(samples * heads, -1, n_keys)
    shape = (samples, heads, n_query, n_keys)
    logits = out(shape) if out is not None else torch.empty(shape, dtype=torch.float32, device=q.device)
    rescale = LOG2E if base2 else 1.0
    flat = logits.view(-1, n_query, n_keys)
    torch.baddbmm(flat, q, k, beta=0, alpha=attn.scale * rescale, out=flat)
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
            logits = logits.add_(mask.float(), alpha=rescale)
    return logits


def output_error(attn, probs: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> float:
    """How far a site's attention output is from its recorded probabilities times its values.

    Args:
        attn: the ``Attention`` module. probs: ``[sample, head, query, token]`` fp32, of the batch rows compared
            (the probe compares the rows it records). value: ``attn.to_v`` output of the same rows,
            ``[sample, token, head * d]``. output: what the processor handed to ``attn.to_out[0]``, of the same rows,
            ``[sample, query, head * d]``.

    Returns:
        ``‖output − probs·V‖ / ‖output‖`` (Frobenius norms): 0 up to rounding where the processor used the recorded
        probabilities; larger where it edits them (Prompt-to-Prompt reweighting) or adds attention (IP-Adapter).
    """
    v = value.float().reshape(*value.shape[:2], attn.heads, -1).transpose(1, 2)  # [sample, head, token, d]
    expect = (probs @ v).transpose(1, 2).flatten(2)  # [sample, query, (head d)]
    got = output.float().reshape(expect.shape)
    return float((got - expect).norm() / got.norm().clamp_min(1e-30))


def with_tolerance(error: float, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """``(error, tolerance)`` of a verify-once check for output computed in ``dtype``; ``(None, None)`` for a
    non-finite error (a diverged output: nothing to compare it by)."""
    if not math.isfinite(error):
        return None, None
    return error, TOLERANCE.get(dtype, HALF_TOLERANCE)


def keep_first(seen: dict, name: str, part: tuple[int, int] | None = None):
    """A forward hook (or pre-hook) that keeps the first output (input) it sees in ``seen[name]``; ``part``:
    ``(i, n)``, the i-th of n chunks of the last dimension (a fused projection). It returns None: a hook that returns
    something replaces the module's output (input)."""

    def keep(module, args, output=None) -> None:
        value = args[0] if output is None else output
        seen.setdefault(name, value if part is None else value.chunk(part[1], dim=-1)[part[0]])

    return keep


def to_out_hook(attn, seen: dict):
    """A pre-hook on ``attn.to_out[0]`` keeping its input in ``seen["out"]`` (``None`` when there is none)."""
    to_out = getattr(attn, "to_out", None)
    if isinstance(to_out, torch.nn.ModuleList) and len(to_out):
        return to_out[0].register_forward_pre_hook(keep_first(seen, "out"))
    return None


def chain(processor):
    """The processor and every ``ProbeProcessor`` it wraps, outermost first (a probe inside another probe wraps its
    wrapper); the last is the processor that runs."""
    while True:
        yield processor
        if not isinstance(processor, ProbeProcessor):
            return
        processor = processor.inner


class ProbeProcessor:
    """Wraps one site's processor: the original computes the output, the wrapper records the probabilities.

    Built by ``attnprobe.capture.kinds.wrap_processor``; ``inner`` is the wrapped processor, restored by the probe on exit. The
    probabilities (``attention_probs``, then ``reduce_probs``) are computed inside the denoiser's forward, so a
    compiled denoiser traces them, and go to ``state.outbox`` for the probe to collect.
    """

    def __init__(self, inner: Any, site: str, attn, state: CaptureState) -> None:
        self.inner = inner
        self.site = site
        self.state = state
        self._armed = False
        self.removed = False  # after remove_hooks: only forwards (a probe unwinding nested wrappers skips it)
        self._query: torch.Tensor | None = None
        self._key: torch.Tensor | None = None
        self._hooks = []
        self.checked = False  # the site's output was compared with its probabilities (output_error)
        self.attn_fused = bool(getattr(attn, "fused_projections", False)) and getattr(attn, "to_kv", None) is not None
        # no q/k normalisation: q and k can wait for the call's end as they are (processor.PendingLogits)
        self.plain = getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
        if getattr(attn, "to_q", None) is None or (getattr(attn, "to_k", None) is None and not self.attn_fused):
            raise ProbeError(f"site {site}: the attention module has no to_q/to_k projection to read q and k from")
        self._hooks.append(attn.to_q.register_forward_hook(self._take_query))
        self._hooks.append((attn.to_kv if self.attn_fused else attn.to_k).register_forward_hook(
            self._take_key_fused if self.attn_fused else self._take_key))

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

    def _run(self, attn, hidden_states, args, kwargs, check):
        """The installed processor's output, computed with the q/k hooks armed; the verify-once hooks (``check``: a
        ``(hooks, seen)`` pair, or ``None``/``False``) removed after, also when it raises."""
        self._armed = True
        try:
            return self.inner(attn, hidden_states, *args, **kwargs)
        finally:
            self._armed = False
            for hook in check[0] if check else ():
                hook.remove()

    def remove_hooks(self) -> None:
        """Detach from the module; from now on the wrapper only forwards to ``inner`` (diffusers may have kept a
        reference, e.g. ``fuse_qkv_projections`` saves the processors it replaces and ``unfuse`` restores them)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.removed = True

    def __call__(self, attn, hidden_states, *args, **kwargs):
        state = self.state
        if self.removed or not state.keep:
            return self.inner(attn, hidden_states, *args, **kwargs)
        self._query = self._key = None
        # False while torch.compile traces (no check, no scratch buffers), None once checked
        check = False if torch.compiler.is_compiling() else None if self.checked else self._check_hooks(attn)
        output = self._run(attn, hidden_states, args, kwargs, check)
        query, key = self._query, self._key
        self._query = self._key = None
        if query is None or key is None:
            raise ProbeError(
                f"site {self.site}: the installed processor {type(self.inner).__name__} did not call "
                f"attn.{'to_q' if query is None else 'to_k'}, so attnprobe cannot read its "
                f"{'query' if query is None else 'key'}. Processors that compute q/k another way are not supported."
            )
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        check_keys(state, self.site, key.shape[1])
        states = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if check is not False and mask is None and self.plain and query.is_cpu and state.pending.defer(
                self.site, attn, query, key, state.rows,
                (lambda full: self._check(attn, full, key, check[1], states)) if check else None):
            return output  # a small site: computed with the call's other small sites at its end
        workspace = state.workspace if query.is_cpu and check is not False else None
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():  # pipelines run without grad
            full = attention_probs(attn, query, key, mask, state.rows, workspace)
            probs = reduce_probs(full, state.heads, state.tokens, workspace)
            probs = probs.to(state.dtype, copy=workspace is not None)  # never hand on a scratch buffer
        state.outbox.append((self.site, probs))
        if check:
            self._check(attn, full, key, check[1], states)
        return output

    def _check_hooks(self, attn):
        """Hooks that take the values and the input of ``to_out[0]`` for one site call (the first recorded)."""
        seen: dict = {}
        hooks = [to_out_hook(attn, seen)]
        projection = attn.to_kv if self.attn_fused else getattr(attn, "to_v", None)
        if projection is not None:
            hooks.append(projection.register_forward_hook(keep_first(seen, "value", (1, 2) if self.attn_fused else None)))
        return [h for h in hooks if h is not None], seen

    def innermost(self):
        """The processor this wrapper (and any probe's wrapper it wraps, in nested probes) runs."""
        *_, inner = chain(self)
        return inner

    def _same_conditioning(self, attn, states, key) -> bool | None:
        """Whether the site attended to the rows the labels describe: its ``encoder_hidden_states`` are the
        denoiser's (UNets, ``state.states``; a hook may change them on the way) and its keys are ``to_k`` of them (a
        processor may reorder or replace them before projecting). ``None``: nothing to compare."""
        if not isinstance(states, torch.Tensor):
            return None  # IP-Adapter's (text, image) tuple, or self-attention
        given = self.state.states
        if isinstance(given, torch.Tensor) and states.shape == given.shape and states is not given:
            if not torch.equal(states, given):
                return False
        with torch.no_grad():
            inputs = attn.norm_encoder_hidden_states(states) if getattr(attn, "norm_cross", None) else states
            keys = attn.to_kv(inputs).chunk(2, dim=-1)[0] if self.attn_fused else attn.to_k(inputs)
        return keys.shape == key.shape and torch.equal(keys, key)

    def _check(self, attn, probs: torch.Tensor, key: torch.Tensor, seen: dict, states=None) -> None:
        """Verify once (``output_error``) on the recorded rows: ``probs`` ``[sample, head, query, token]`` are their
        probabilities before any reduction. The result goes to ``state.checks`` as ``(site, processor, error or None,
        tolerance, conditioning)``; ``None``: the processor called no ``to_v`` or ``to_out[0]`` to compare, or its
        output is not finite (nothing to compare it by)."""
        self.checked = True
        name = type(self.innermost()).__name__
        same = self._same_conditioning(attn, states, key)
        if "value" not in seen or "out" not in seen:
            self.state.checks.append((self.site, name, None, None, same))
            return
        out, rows = seen["out"], self.state.rows
        with torch.no_grad():
            error = output_error(attn, probs, batch_rows(seen["value"], rows), batch_rows(out, rows))
        self.state.checks.append((self.site, name, *with_tolerance(error, out.dtype), same))

    def __repr__(self) -> str:
        return f"ProbeProcessor(site={self.site!r}, inner={self.inner!r})"
