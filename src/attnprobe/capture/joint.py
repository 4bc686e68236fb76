"""Joint attention (SD3, Flux): the image-query × text-key block of attention over ``[image; text]`` keys.

In a joint-attention layer (an MM-DiT block) image and text tokens attend to each other in one softmax over all
keys. A site's map is the block where image positions query text keys, in one of two definitions
(``probe(joint=...)``):

- ``"exact"`` (default): that block of the full softmax, ``p[i, t] = exp(l[i, t] − logsumexp_j l[i, j])`` with
  ``j`` over every key (image and text). A row sums to the query's **text share** ``Σ_t p[i, t]`` ∈ [0, 1]: what
  the image position takes from the text at all.
- ``"renorm"``: softmax over the text keys only, ``p[i, t] = exp(l[i, t] − logsumexp_t' l[i, t'])``: rows sum to 1,
  comparable with UNet cross-attention; ``exact / exact.sum(-1)`` equals it.

Logits are ``l = q·kᵀ / √head_dim`` (the scaled-dot-product default the processors use) in fp32, from the
processor's own q and k (after ``norm_q``/``norm_k``/``norm_added_q``/``norm_added_k`` and, for Flux, the rotary
embedding). ``exact`` runs over image queries in chunks with the full-row logsumexp, so the ``N × (N + T)``
matrix is never held for all image queries at once (``CHUNK_ELEMENTS``).

Site kinds: ``"joint"`` (a double-stream block: image tokens through ``to_q``/``to_k``, text through
``add_q_proj``/``add_k_proj``) and ``"single"`` (a Flux single-stream block: one ``[text; image]`` sequence through
``to_q``/``to_k``; the text length is that of the ``encoder_hidden_states`` the transformer was called with).
"""

from __future__ import annotations

import inspect

import torch

from ..errors import ProbeError
from .cross import ProbeProcessor, keep_first, to_out_hook, with_tolerance
from .processor import batch_rows, check_keys, reduce_probs

__all__ = ["JOINT_MODES", "CHUNK_ELEMENTS", "joint_probs", "joint_output_error", "mask_bias", "JointProbeProcessor"]

JOINT_MODES = ("exact", "renorm")

#: ``exact``: image queries per chunk are chosen so that a chunk's logits (sample × head × chunk × (N + T)) hold at
#: most this many fp32 values (2**26: 256 MiB)
CHUNK_ELEMENTS = 2**26


def joint_probs(
    query: torch.Tensor, image_keys: torch.Tensor, text_keys: torch.Tensor, mode: str = "exact",
    chunk: int | None = None, bias: tuple | None = None, reduce: tuple | None = None, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-query × text-key probabilities of one joint-attention call, in fp32, computed in chunks of image queries.

    Args:
        query: image queries, ``[sample, head, query, d]`` (scaled, or see ``scale``).
        image_keys: ``[sample, head, N, d]`` (the image keys of the same softmax).
        text_keys: ``[sample, head, T, d]``.
        mode: ``"exact"`` (the text block of the softmax over all N + T keys) or ``"renorm"`` (softmax over the T
            text keys). Default ``"exact"``.
        chunk: image queries per step. Default: from ``CHUNK_ELEMENTS`` (a chunk's logits hold at most that many fp32
            values: a video's queries never make one ``[sample, head, query, key]`` tensor).
        bias: ``(image_bias, text_bias)`` added to the logits, as the processor's attention mask adds them
            (``-inf`` for masked keys), broadcastable to ``[sample, head, query, N]`` and ``[…, T]``; ``None``: none.
        reduce: ``(heads, tokens, dtype)``: apply ``reduce_probs`` and the cast to ``dtype`` chunk by chunk, so that
            only the reduced maps are ever whole. Default: ``None`` (the fp32 probabilities, whole).
        scale: multiplies each chunk of ``query`` (a caller's unscaled view need not be copied whole). Default 1.

    Returns:
        ``(probs, share)``: ``probs`` ``[sample, head, query, token]`` float32 (with ``reduce``: ``[sample, head or 1,
        query, kept token]`` in its dtype; rows sum to the text share for ``exact``, to 1 for ``renorm``, before any
        token selection) and ``share`` ``[sample, head]``, the text share averaged over image queries (``None`` for
        ``renorm``, which never computes the image keys' logits).
    """
    text_t = text_keys.float().transpose(-1, -2)
    s, h, n, _ = query.shape
    t = text_t.shape[-1]
    image_bias, text_bias = bias or (None, None)
    image_t = None if mode == "renorm" else image_keys.float().transpose(-1, -2)
    keys = t + (0 if image_t is None else image_t.shape[-1])
    step = chunk or max(1, CHUNK_ELEMENTS // max(1, s * h * keys))
    out = None if reduce else torch.empty((s, h, n, t), device=query.device)
    share = None if image_t is None else torch.zeros((s, h), device=query.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        q = query[:, :, start:stop].float()
        q = q * scale if scale != 1.0 else q
        text = _biased(torch.matmul(q, text_t), _query_rows(text_bias, start, stop))  # [sample, head, chunk, T]
        if image_t is None:
            probs = text.softmax(dim=-1)
        else:
            image = _biased(torch.matmul(q, image_t), _query_rows(image_bias, start, stop))  # [sample, head, chunk, N]
            top = image.amax(-1, keepdim=True)
            image_lse = image.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))  # in place: one chunk-sized tensor
            lse = torch.logaddexp(image_lse, text.logsumexp(-1))  # over all N + T keys
            del image
            probs = torch.exp(text.sub_(lse.unsqueeze(-1)), out=None if reduce else out[:, :, start:stop])
            share += probs.sum(-1).sum(-1)
        if reduce is None:
            if image_t is None:
                out[:, :, start:stop] = probs
            continue
        kept = reduce_probs(probs, reduce[0], reduce[1])
        if out is None:
            out = torch.empty((s, kept.shape[1], n, kept.shape[-1]), dtype=reduce[2], device=query.device)
        out[:, :, start:stop] = kept
    return out, None if share is None else share / n


def _biased(logits: torch.Tensor, bias) -> torch.Tensor:
    return logits if bias is None else logits.add_(bias)


def _query_rows(bias, start: int, stop: int):
    """The image queries ``start:stop`` of a bias ``[sample, head, query | 1, key]`` (one row: every query's)."""
    return None if bias is None else bias[:, :, start:stop] if bias.shape[2] > 1 else bias


def mask_bias(mask: torch.Tensor, rows, n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(image_bias, text_bias)`` of an attention mask over a ``[text; image]`` sequence, for the image queries
    of the recorded batch ``rows``: a boolean mask (``True`` = attend) becomes 0 / ``-inf``; a float mask is added
    to the logits as it is (scaled-dot-product attention adds it). Each ``[sample, 1 | head, query | 1, N | T]``.

    Args:
        mask: ``[sample, key]``, ``[sample, query, key]`` or ``[sample, 1 | head, query | 1, key]``.
        rows: the recorded batch rows (a slice or index tensor; ``None``: all). n_text: text positions first.
    """
    m = mask if mask.dim() == 4 else mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
    if isinstance(rows, torch.Tensor):
        m = m.index_select(0, rows.to(m.device)) if m.shape[0] > 1 else m
    elif rows is not None and m.shape[0] > 1:
        m = m[rows]
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, device=m.device).masked_fill_(~m, float("-inf"))
    m = m.float()
    m = m[:, :, n_text:] if m.shape[2] > 1 else m  # image queries
    return m[..., n_text:], m[..., :n_text]


def joint_output_error(query, image_keys, text_keys, image_values, text_values, output, chunk: int | None = None,
                       bias: tuple | None = None) -> float:
    """How far a joint site's image output is from attention over all its keys times all its values (the
    verify-once check of ``cross.output_error`` for joint attention).

    Args:
        query, image_keys, text_keys: as for ``joint_probs`` (every batch row), ``[sample, head, position, d]``.
        image_values, text_values: ``[sample, head, N | T, d]``. output: the image part of the attention output
            before ``attn.to_out[0]`` (what a single-stream processor returns), ``[sample, N, head * d]``.

    Returns:
        ``‖output − softmax(q·[k_img; k_txt]ᵀ)·[v_img; v_txt]‖ / ‖output‖``: 0 up to rounding for a processor that
        computes plain joint attention; larger where it edits the attention.
    """
    keys = torch.cat([image_keys, text_keys], dim=2).float().transpose(-1, -2)
    values = torch.cat([image_values, text_values], dim=2).float()
    s, h, n, _ = query.shape
    step = chunk or max(1, CHUNK_ELEMENTS // max(1, s * h * keys.shape[-1]))
    full = None if bias is None else torch.cat(bias, dim=-1)  # [image; text], as the keys are (one mask's slices)
    expect = torch.cat([_biased(torch.matmul(query[:, :, i:i + step].float(), keys), _query_rows(full, i, i + step)
                                ).softmax(-1) @ values
                        for i in range(0, n, step)], dim=2)
    expect = expect.transpose(1, 2).reshape(s, n, -1)
    got = output.float().reshape(expect.shape)
    return float((got - expect).norm() / got.norm().clamp_min(1e-30))


def _rotary(x: torch.Tensor, emb, start: int, stop: int | None) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` (the processor's own) on ``x`` ``[sample, seq, head, d]`` with the rows
    ``start:stop`` of the rotary table, which covers the processor's whole ``[text; image]`` sequence."""
    from diffusers.models.embeddings import apply_rotary_emb

    if emb is None:
        return x
    cos, sin = emb
    return apply_rotary_emb(x, (cos[start:stop], sin[start:stop]), sequence_dim=1)


class JointProbeProcessor(ProbeProcessor):
    """Wraps one joint (``kind="joint"``) or single-stream (``kind="single"``) site's processor.

    The installed processor computes the output unchanged; forward hooks read the image q and k (``to_q``,
    ``to_k``, or a fused ``to_qkv``) and the text k (``add_k_proj`` or ``to_added_qkv``); the wrapper then applies
    the module's norms and the rotary embedding the processor got, and computes ``joint_probs`` beside it.
    """

    def __init__(self, inner, site: str, attn, state, kind: str = "joint") -> None:
        self.inner, self.site, self.state, self.kind = inner, site, state, kind
        self._armed, self.removed, self.checked = False, False, False
        self._query = self._key = self._text_key = None
        self._hooks = []
        sig = inspect.signature(inner.__call__ if not inspect.isfunction(inner) else inner)
        self._names = [p.name for p in sig.parameters.values()
                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][2:]  # after attn, hidden_states
        fused = bool(getattr(attn, "fused_projections", False)) and getattr(attn, "to_qkv", None) is not None
        if fused:
            self._hooks.append(attn.to_qkv.register_forward_hook(self._take_qkv))
        elif getattr(attn, "to_q", None) is not None and getattr(attn, "to_k", None) is not None:
            self._hooks.append(attn.to_q.register_forward_hook(self._take_query))
            self._hooks.append(attn.to_k.register_forward_hook(self._take_key))
        else:
            raise ProbeError(f"site {site}: the attention module has no to_q/to_k (or fused to_qkv) to read q and k from")
        if kind == "joint":
            added = getattr(attn, "to_added_qkv", None) if fused else None
            if added is not None:
                self._hooks.append(added.register_forward_hook(self._take_added_qkv))
            else:
                self._hooks.append(attn.add_k_proj.register_forward_hook(self._take_text_key))

    def _take_qkv(self, module, args, output):
        if self._armed and self._query is None:
            self._query, self._key, _ = output.chunk(3, dim=-1)

    def _take_text_key(self, module, args, output):
        if self._armed and self._text_key is None:
            self._text_key = output

    def _take_added_qkv(self, module, args, output):
        if self._armed and self._text_key is None:
            self._text_key = output.chunk(3, dim=-1)[1]

    def _argument(self, name: str, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = self._names.index(name) if name in self._names else -1
        return args[i] if 0 <= i < len(args) else None

    def __call__(self, attn, hidden_states, *args, **kwargs):
        state = self.state
        if self.removed or not state.keep:
            return self.inner(attn, hidden_states, *args, **kwargs)
        self._query = self._key = self._text_key = None
        check = None if self.checked or torch.compiler.is_compiling() else self._check_hooks(attn)
        output = self._run(attn, hidden_states, args, kwargs, check)
        query, key, text_key = self._query, self._key, self._text_key
        self._query = self._key = self._text_key = None
        if query is None or key is None or (self.kind == "joint" and text_key is None):
            missing = "to_q" if query is None else "to_k" if key is None else "add_k_proj"
            raise ProbeError(
                f"site {self.site}: the installed processor {type(self.inner).__name__} did not call attn.{missing} "
                "(or the fused projection), so attnprobe cannot read its q and k. Processors that compute q/k another "
                "way are not supported."
            )
        mask = self._argument("attention_mask", args, kwargs)
        if mask is not None and type(attn).__name__ != "FluxAttention":
            raise ProbeError(
                f"site {self.site}: the joint-attention processor got an attention_mask; attnprobe reads the masks "
                f"of Flux-style attention ([text; image], Chroma), not of {type(attn).__name__}"
            )
        emb = self._argument("image_rotary_emb", args, kwargs)
        with torch.no_grad():
            q_img, k_img, k_txt, _ = self._split(attn, query, key, text_key, emb, state)
            check_keys(state, self.site, k_txt.shape[2])
            bias = None if mask is None else mask_bias(mask, state.rows, k_txt.shape[2])
            probs, share = joint_probs(q_img, k_img, k_txt, state.joint, bias=bias,
                                       reduce=(state.heads, state.tokens, state.dtype))
        state.outbox.append((self.site, probs))
        if share is not None:
            state.shares.append((self.site, share.mean(1, keepdim=True) if state.heads == "mean" else share))
        if state.relate is not None:  # probe(relations=...): other blocks of the same attention
            state.relate.at_joint(self, attn, query, key, text_key, emb, mask)
        if check is not None:
            self._check_joint(attn, query, key, text_key, emb, check[1], output, mask)
        return output

    def _check_hooks(self, attn):
        """Hooks that take the image and text values and the input of ``to_out[0]`` for one site call (a
        single-stream site: the values of its ``[text; image]`` sequence; its processor returns the attention output
        without ``to_out``)."""
        seen: dict = {}
        fused = bool(getattr(attn, "fused_projections", False)) and getattr(attn, "to_qkv", None) is not None
        image = attn.to_qkv if fused else getattr(attn, "to_v", None)
        if self.kind == "single":  # the values of the whole [text; image] sequence
            return ([image.register_forward_hook(keep_first(seen, "sequence", (2, 3) if fused else None))]
                    if image is not None else []), seen
        hooks = [to_out_hook(attn, seen)]
        added = getattr(attn, "to_added_qkv", None) if fused else None
        text = added if added is not None else getattr(attn, "add_v_proj", None)
        for name, module, part in (("image", image, (2, 3) if fused else None),
                                   ("text", text, (2, 3) if added is not None else None)):
            if module is not None:
                hooks.append(module.register_forward_hook(keep_first(seen, name, part)))
        return [h for h in hooks if h is not None], seen

    def _check_joint(self, attn, query, key, text_key, emb, seen: dict, output, mask=None) -> None:
        """Verify once (``joint_output_error``) into ``state.checks``, as ``ProbeProcessor._check`` does."""
        self.checked = True
        name = type(self.innermost()).__name__
        t = self.state.text_len
        if "sequence" in seen and isinstance(output, torch.Tensor) and output.shape[:2] == seen["sequence"].shape[:2]:
            seen = {"out": output[:, t:], "image": seen["sequence"][:, t:], "text": seen["sequence"][:, :t]}
        if not {"out", "image", "text"} <= set(seen):
            self.state.checks.append((self.site, name, None, None, None))
            return
        out = seen["out"]
        with torch.no_grad():
            q_img, k_img, k_txt, _ = self._split(attn, query, key, text_key, emb, self.state, rows=None)
            out = out[:, :q_img.shape[2]]  # the image queries recorded (Kontext's input image's are not)
            values = [seen[k].unflatten(-1, (attn.heads, -1)).transpose(1, 2) for k in ("image", "text")]
            bias = None if mask is None else mask_bias(mask, None, k_txt.shape[2])
            error = joint_output_error(q_img, k_img, k_txt, *values, out, bias=bias)
        self.state.checks.append((self.site, name, *with_tolerance(error, out.dtype), None))

    def _split(self, attn, query, key, text_key, emb, state, rows="state", text_query=None):
        """Image queries (scaled), image keys, text keys and text queries (scaled; ``None`` unless ``text_query``
        is given: ``add_q_proj``'s output at a joint site, ``True`` at a single-stream one) ``[sample, head, position,
        d]``, as the processor has them just before attention (norms, then rotary embedding on the ``[text; image]``
        sequence for Flux), of the recorded rows (``rows=None``: every row)."""
        rows = state.rows if rows == "state" else rows
        heads = attn.heads
        query, key = batch_rows(query, rows), batch_rows(key, rows)
        query = query.unflatten(-1, (heads, -1))  # [sample, seq, head, d] (Flux's layout; norms act on d)
        key = key.unflatten(-1, (heads, -1))
        d = query.shape[-1]
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        if self.kind == "single":
            t = state.text_len
            if not 0 < t < query.shape[1]:
                raise ProbeError(
                    f"site {self.site}: a single-stream site got {query.shape[1]} positions but the transformer was "
                    f"called with {t} text tokens; attnprobe expects [text; image] in one sequence"
                )
            query, key = _rotary(query, emb, 0, None), _rotary(key, emb, 0, None)
            q_img, k_img, k_txt = query[:, t:], key[:, t:], key[:, :t]
            q_txt = query[:, :t] if text_query is not None else None
        else:
            text_key = batch_rows(text_key, rows).unflatten(-1, (heads, -1))
            if getattr(attn, "norm_added_k", None) is not None:
                text_key = attn.norm_added_k(text_key)
            t = text_key.shape[1]
            # Flux's processor rotates the [text; image] sequence; SD3's has no rotary embedding (emb is None)
            q_img, k_img, k_txt = _rotary(query, emb, t, None), _rotary(key, emb, t, None), _rotary(text_key, emb, 0, t)
            q_txt = None
            if text_query is not None:
                q_txt = batch_rows(text_query, rows).unflatten(-1, (heads, -1))
                if getattr(attn, "norm_added_q", None) is not None:
                    q_txt = attn.norm_added_q(q_txt)
                q_txt = _rotary(q_txt, emb, 0, t)
        if state.image_len and q_img.shape[1] > state.image_len:  # Kontext: its input image's tokens are keys only
            q_img = q_img[:, :state.image_len]
        q_img = q_img.transpose(1, 2).float() * d**-0.5
        q_txt = None if q_txt is None else q_txt.transpose(1, 2).float() * d**-0.5
        return q_img, k_img.transpose(1, 2), k_txt.transpose(1, 2), q_txt
