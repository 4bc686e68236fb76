"""Sites read at their attention kernel: q, k and the mask exactly as the model hands them to
``torch.nn.functional.scaled_dot_product_attention``, after every norm, rotary embedding and concatenation its
processor applies.

The families of newer diffusers denoisers (Qwen-Image, Flux.2, Sana, HunyuanDiT, …) each prepare q and k their own
way (complex rotary tables, rotary embeddings on the query only, text and image tables apart, grouped-query heads).
Rather than re-implement each, ``KernelProbeProcessor`` runs the installed processor unchanged under a
``TorchFunctionMode`` that keeps the arguments of its one ``scaled_dot_product_attention`` call (diffusers'
``dispatch_attention_fn`` reaches it through the native backend) and computes the site's map from them:

- ``cross``: every query is an image position, every key a text position: ``softmax(q·kᵀ·scale + mask)`` over
  the text keys (rows sum to 1).
- ``joint`` (the processor got the image stream and ``encoder_hidden_states``) and ``single`` (one sequence of
  ``state.text_len`` text positions and the image positions): the image-query × text-key block of the one softmax over
  all keys, ``exact`` or ``renorm`` as ``attnprobe.capture.joint.joint_probs`` defines them. Where the text sits in
  the sequence (first or last) is the family's ``text_first``; the queries are the same sequence (MM-DiT) or the image
  positions alone (DeepFloyd IF's added-KV attention over ``[text; image]`` keys). Keys a denoiser adds right before
  or after its text keys (AuraFlow's registers, Stable Cascade's pooled text and image embedding) share the softmax
  with the image keys and are not on the ``token`` axis: an ``exact`` map is ``[sample, head, query, token]`` whose
  rows sum to the text share, the rest being the image's and the added keys'.

- a family whose processor calls the kernel once per batch row over ``[image; that row's attended text]``
  (``Family.row_calls``, Mochi 1): call ``b`` is row ``b``'s softmax; its text keys go back to their positions on the
  ``token`` axis, and the ones its ``encoder_attention_mask`` leaves out get exactly 0.

Any other processor that calls the kernel more than once, or not at all (another attention backend: flash-attn,
xformers), is refused with a message that says which. Verify once: the kernel's output is compared with
``softmax(q·kᵀ·scale + mask)·v`` of what was read (``state.checks``).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from ..errors import ProbeError
from .cross import ProbeProcessor, with_tolerance
from .joint import joint_output_error, joint_probs
from .processor import batch_rows, check_keys

__all__ = ["KernelTap", "KernelProbeProcessor", "sequence_bias"]

_SDPA = torch.nn.functional.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class KernelTap(TorchFunctionMode):
    """Keeps the arguments and output of every ``scaled_dot_product_attention`` call made while it is active
    (``calls``: dicts of ``query``, ``key``, ``value`` ``[sample, head, position, d]``, ``attn_mask``, ``scale``,
    ``dropout_p``, ``is_causal``, ``enable_gqa``, ``output``). Everything else runs as it would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _SDPA:
            seen = dict(zip(_SDPA_ARGS, args))
            seen.update(kwargs)
            seen["output"] = out
            self.calls.append(seen)
        return out


def sequence_bias(mask, rows, queries: slice, keys: slice):
    """The additive bias of an ``attn_mask`` ``[sample | 1, head | 1, query | 1, key]`` (or fewer leading
    dimensions) for the recorded batch ``rows``, image ``queries`` and the ``keys`` slice: a boolean mask (``True``
    = attend) becomes 0 / ``-inf``, a float one is added as it is."""
    if mask is None:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if m.shape[0] > 1 and rows is not None:
        m = m[rows] if isinstance(rows, slice) else m.index_select(0, rows.to(m.device))
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, device=m.device).masked_fill_(~m, float("-inf"))
    m = m.float()
    m = m[:, :, queries] if m.shape[2] > 1 else m
    return m[..., keys] if isinstance(keys, slice) else m.index_select(3, keys.to(m.device))


class KernelProbeProcessor(ProbeProcessor):
    """Wraps one site's processor of a family read at the kernel (``Family.reader == "kernel"``): see the module
    docstring. ``kind``: ``"cross"``, ``"joint"`` or ``"single"``; ``text_first``: the text positions come before the
    image ones in a joint or single-stream sequence."""

    def __init__(self, inner, site: str, attn, state, kind: str = "cross", text_first: bool = True) -> None:
        self.inner, self.site, self.state, self.kind, self.text_first = inner, site, state, kind, text_first
        self.removed, self.checked, self._hooks = False, False, []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        state = self.state
        if self.removed or not state.keep or torch.compiler.is_compiling():
            if torch.compiler.is_compiling() and state.keep:
                raise ProbeError(f"site {self.site}: sites read at the attention kernel cannot be compiled; probe "
                                 "the denoiser uncompiled")
            return self.inner(attn, hidden_states, *args, **kwargs)
        tap = KernelTap()
        with tap:
            output = self.inner(attn, hidden_states, *args, **kwargs)
        if state.row_mask is not None and self.kind != "cross":
            return self._row_calls(tap.calls, hidden_states.shape[1], output)
        if len(tap.calls) != 1:
            backend = getattr(self.inner, "_attention_backend", None)
            raise ProbeError(
                f"site {self.site}: its processor {type(self.innermost()).__name__} called "
                f"scaled_dot_product_attention {len(tap.calls)} times (attention backend {backend or 'default'}); "
                "attnprobe reads q and k at its one call. Use the model's own processor (a classic AttnProcessor "
                "computes attention another way) with the native backend (denoiser.set_attention_backend('native'))"
            )
        seen = tap.calls[0]
        query, key, mask = seen["query"], seen["key"], seen.get("attn_mask")
        if seen.get("is_causal") or seen.get("dropout_p"):
            raise ProbeError(f"site {self.site}: its attention is causal or has dropout; attnprobe reads plain "
                             "(bidirectional, dropout-free) attention")
        if key.shape[1] != query.shape[1]:  # grouped-query attention: each key head serves several query heads
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            seen["value"] = seen["value"].repeat_interleave(query.shape[1] // seen["value"].shape[1], dim=1)
        if state.row_text is not None and self.kind != "cross":
            return self._per_row(query, key, mask, seen, output)
        if state.text_order is not None and self.kind != "cross":
            return self._ordered(query, key, mask, seen, output, hidden_states.shape[1])
        # a 4-D hidden_states (Stable Cascade's [sample, channel, h, w]) holds h·w positions
        n_hidden = hidden_states.shape[1] if hidden_states.dim() == 3 else hidden_states[0, 0].numel()
        image_q, others, text = self._positions(query.shape[2], key.shape[2], n_hidden)
        scale = seen.get("scale") or query.shape[-1] ** -0.5
        rows = state.rows
        with torch.no_grad():
            check_keys(state, self.site, text.stop - text.start)
            q = batch_rows(query, rows)[:, :, image_q]  # a view: scaled chunk by chunk (a video's q is GBs in fp32)
            k = batch_rows(key, rows)
            mode = "renorm" if self.kind == "cross" else state.joint
            other_k = k[:, :, others] if isinstance(others, slice) else k.index_select(2, others.to(k.device))
            bias = None if mask is None else (sequence_bias(mask, rows, image_q, others),
                                              sequence_bias(mask, rows, image_q, text))
            probs, share = joint_probs(q, other_k, k[:, :, text], mode, bias=bias, scale=scale,
                                       reduce=(state.heads, state.tokens, state.dtype))
        if state.relate is not None:  # probe(relations=...): other blocks of the same softmax
            state.relate.at_kernel(self, query, key, mask, scale, (image_q, others, text))
        self._hand_on(probs, share)
        if not self.checked:
            self._check_kernel(query, key, mask, scale, seen)
        return output

    def _per_row(self, query, key, mask, seen, output):
        """A denoiser that puts each row's own ``L_b`` text positions into its sequence (``state.row_text``):
        Lumina 2's row is ``[L_b text; N image; batch padding]``, Z-Image's ``[N image; pad; L_b text; pad; batch
        padding]`` (``text_first=False``, image positions padded to a multiple of ``state.pad_to``). The ``token``
        axis holds the denoiser's text positions (``state.n_keys``), those past ``L_b`` get probability 0 (not in
        that row's sequence); every key but the row's text shares the softmax (``exact``)."""
        state, rows = self.state, self.state.rows
        lens = batch_rows(state.row_text.to(query.device), rows).long()
        n_text, n_keys = state.n_keys, key.shape[2]
        if self.text_first:
            n_image = n_keys - int(state.row_text.max())
            text_start, image_at = 0, lens
        else:
            n_image, pad = state.image_len, max(state.pad_to, 1)
            text_start, image_at = -(-n_image // pad) * pad, torch.zeros_like(lens)
        scale = seen.get("scale") or query.shape[-1] ** -0.5
        with torch.no_grad():
            check_keys(state, self.site, n_text)
            q, k = batch_rows(query, rows), batch_rows(key, rows)
            if n_keys < text_start + n_text:  # a short caption: the sequence ends before the token axis does
                k = torch.nn.functional.pad(k, (0, 0, 0, text_start + n_text - n_keys))
            where = (image_at[:, None] + torch.arange(n_image, device=q.device))[:, None, :, None]  # [b, 1, N, 1]
            q = q.gather(2, where.expand(-1, q.shape[1], -1, q.shape[3])).float() * scale
            position = torch.arange(max(n_keys, text_start + n_text), device=q.device)[None, :]
            own_text = (position >= text_start) & (position < text_start + lens[:, None])  # [b, keys]
            others = torch.zeros(own_text.shape, device=q.device).masked_fill_(own_text, float("-inf"))
            others = others[:, None, None, :n_keys]
            if mask is not None:
                others = others + sequence_bias(mask, rows, slice(0, 1), slice(0, n_keys))[:, :, :1]
            past = ~own_text[:, text_start:text_start + n_text]
            text_bias = torch.zeros(past.shape, device=q.device).masked_fill_(past, float("-inf"))[:, None, None]
            probs, share = joint_probs(q, k[:, :, :n_keys], k[:, :, text_start:text_start + n_text], state.joint,
                                       bias=(others, text_bias), reduce=(state.heads, state.tokens, state.dtype))
        self._hand_on(probs, share)
        if not self.checked:
            self._check_kernel(query, key, mask, scale, seen)
        return output

    def _ordered(self, query, key, mask, seen, output, n_image: int):
        """A denoiser that reorders each row's keys after its ``n_image`` image positions by its masks
        (``state.text_order``: HunyuanVideo 1.5's ``[attended image tokens; attended ByT5; attended Qwen; masked image
        tokens; masked ByT5; masked Qwen]``): each row's ``token``-axis keys are gathered from their own positions,
        the keys it adds (image tokens) share the softmax with the image's. The mask row of the image queries (one
        for all of them, checked) biases every key: masked keys get probability 0. ``exact`` rows sum to the text
        share, ``renorm`` rows to 1.

        Raises:
            ProbeError: a sequence that is not ``[image; text block]`` of the order's length, image queries whose
                mask rows differ, or ``probe(relations=...)`` (not read for a per-row order).
        """
        state, rows = self.state, self.state.rows
        n_text, n_added = (int(t.shape[1]) for t in state.text_order)
        n_keys = key.shape[2]
        m = None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if (query.shape[2] != n_keys or n_keys != n_image + n_text + n_added
                or (m is not None and m.shape[2] > 1 and not bool((m[:, :, :n_image] == m[:, :, :1]).all()))):
            raise ProbeError(
                f"site {self.site}: its attention has {query.shape[2]} queries and {n_keys} keys, not one sequence of "
                f"{n_image} image positions then {n_text} text and {n_added} added keys whose image queries share one "
                "mask row; attnprobe cannot tell each row's text keys apart"
            )
        if state.relate is not None:
            raise ProbeError(f"site {self.site}: probe(relations=...) is not read for a denoiser that orders each "
                             "row's text keys by its masks; probe it without relations")
        scale = seen.get("scale") or query.shape[-1] ** -0.5
        with torch.no_grad():
            check_keys(state, self.site, n_text)
            q, k = batch_rows(query, rows)[:, :, :n_image], batch_rows(key, rows)
            text_at, added_at = (batch_rows(t.to(k.device), rows) for t in state.text_order)
            image = torch.arange(n_image, device=k.device).expand(k.shape[0], -1)
            text_at, others_at = n_image + text_at, torch.cat([image, n_image + added_at], 1)  # [b, keys]

            def pick(x, at, axis):  # x's positions ``at`` (per row) along ``axis``
                shape = list(x.shape)
                shape[axis] = at.shape[1]
                index = at.reshape(at.shape[0], *([1] * (axis - 1)), at.shape[1], *([1] * (x.dim() - axis - 1)))
                return x.gather(axis, index.expand(*shape))

            bias = None
            if mask is not None:  # the image queries' one mask row: [b, 1 | head, 1, keys]
                row = sequence_bias(mask, rows, slice(0, 1), slice(0, n_keys)).expand(k.shape[0], -1, -1, -1)
                bias = (pick(row, others_at, 3), pick(row, text_at, 3))
            probs, share = joint_probs(q, pick(k, others_at, 2), pick(k, text_at, 2), state.joint, bias=bias,
                                       scale=scale, reduce=(state.heads, state.tokens, state.dtype))
        self._hand_on(probs, share)
        if not self.checked:
            self._check_kernel(query, key, mask, scale, seen, slice(0, n_image))
        return output

    def _row_calls(self, calls: list[dict], n_image: int, output):
        """A processor that calls the kernel once per batch row over ``[image; that row's attended text]``
        (``state.row_mask``, ``[batch, text]``: Mochi 1's ``encoder_attention_mask``), call ``b`` being row ``b``'s.
        Each recorded row's map is the image-query × text-key block of its own softmax, its text keys put back at
        their positions on the ``token`` axis (``state.n_keys``): the positions its mask leaves out get probability
        exactly 0 (they are in none of its softmax). ``exact`` rows sum to the row's text share, ``renorm`` rows to 1.

        Raises:
            ProbeError: not one call per batch row, a call that is not ``[image; the row's attended text]`` (its
                length), with a mask, causal or with dropout, or ``renorm`` for a row that attends to no text.
        """
        state = self.state
        mask = state.row_mask.to(calls[0]["query"].device) if calls else state.row_mask
        batch, n_text = mask.shape
        if len(calls) != batch:
            raise ProbeError(
                f"site {self.site}: its processor {type(self.innermost()).__name__} called scaled_dot_product_attention "
                f"{len(calls)} times for a batch of {batch} rows; attnprobe reads one call per batch row over [image; "
                "that row's attended text] (MochiAttnProcessor2_0) with the native attention backend"
            )
        check_keys(state, self.site, n_text)
        rows = state.rows
        kept = (range(batch) if rows is None else range(*rows.indices(batch)) if isinstance(rows, slice)
                else rows.tolist())
        maps, shares = [], []
        with torch.no_grad():
            for b in kept:
                seen, own = calls[b], mask[b].nonzero().flatten()
                query, key = seen["query"], seen["key"]
                if (seen.get("attn_mask") is not None or seen.get("is_causal") or seen.get("dropout_p")
                        or query.shape[0] != 1 or key.shape[1] != query.shape[1]
                        or query.shape[2] != n_image + len(own) or key.shape[2] != query.shape[2]):
                    raise ProbeError(
                        f"site {self.site}: kernel call {b} has queries {tuple(query.shape)} and keys "
                        f"{tuple(key.shape)}, not one row of {n_image} image and {len(own)} attended text positions "
                        "(its encoder_attention_mask) without a mask, causality or dropout: attnprobe cannot tell "
                        "its text keys apart"
                    )
                if not len(own) and state.joint == "renorm":
                    raise ProbeError(
                        f"site {self.site}: batch row {b} attends to no text position (its encoder_attention_mask is "
                        "all 0: an empty prompt with force_zeros_for_empty_prompt), so joint='renorm' has nothing to "
                        "renormalise over; use joint='exact' (that row's maps are 0, its text share 0)"
                    )
                text = key.new_zeros((1, key.shape[1], n_text, key.shape[3]))
                text[:, :, own] = key[:, :, n_image:]  # back at their positions on the token axis
                past = torch.zeros(n_text, device=key.device).masked_fill_(~mask[b], float("-inf"))
                probs, share = joint_probs(query[:, :, :n_image], key[:, :, :n_image], text, state.joint,
                                           bias=(None, past[None, None, None]), scale=seen.get("scale") or
                                           query.shape[-1] ** -0.5, reduce=(state.heads, state.tokens, state.dtype))
                maps.append(probs)
                shares.append(share)
        if not self.checked:
            self._check_rows(calls)
        if not maps:  # no recorded row in this call: an empty map, as batch_rows gives the other readers
            heads = calls[0]["query"].shape[1]
            tokens = n_text if state.tokens is None else len(state.tokens)
            maps = [torch.empty((0, 1 if state.heads == "mean" else heads, n_image, tokens), dtype=state.dtype,
                                device=mask.device)]
            shares = [None if state.joint == "renorm" else torch.empty((0, heads), device=mask.device)]
        self._hand_on(torch.cat(maps), None if shares[0] is None else torch.cat(shares))
        return output

    def _check_rows(self, calls: list[dict]) -> None:
        """Verify once: each row's kernel output against ``softmax(q·kᵀ·scale)·v`` of its call (the largest error)."""
        self.checked = True
        errors, dtype = [], calls[0]["output"].dtype if calls else torch.float32
        with torch.no_grad():
            for seen in calls:
                q, k, v, out = seen["query"], seen["key"], seen["value"], seen["output"]
                scale = seen.get("scale") or q.shape[-1] ** -0.5
                errors.append(joint_output_error(q.float() * scale, k, k[:, :, :0], v, v[:, :, :0],
                                                 out.transpose(1, 2).flatten(2)))
        self.state.checks.append((self.site, type(self.innermost()).__name__, *with_tolerance(max(errors), dtype),
                                  None))

    def _hand_on(self, probs, share) -> None:
        """The site's map and text share to the probe's outbox."""
        state = self.state
        state.outbox.append((self.site, probs))
        if share is not None:
            state.shares.append((self.site, share.mean(1, keepdim=True) if state.heads == "mean" else share))

    def _positions(self, n_query: int, n_key: int, n_hidden: int) -> tuple[slice, slice | torch.Tensor, slice]:
        """The image queries, the other keys of the softmax (a slice, or the positions where the denoiser adds keys)
        and the text keys of the kernel's sequences. The text keys and the keys the denoiser adds next to them
        (before: AuraFlow's register tokens, ``state.extra_keys``; after: Stable Cascade's pooled text and image
        embedding, ``state.keys_after``) are one block, before the image positions or after them (``text_first``):
        ``[before; text; after; image]`` or ``[image; before; text; after]``. Text keys: as many as the denoiser was
        given text positions (``state.n_keys``; else the keys beyond the image stream, or ``state.text_len``); queries
        are image positions only (DeepFloyd IF's added-KV attention over ``[text; image]`` keys, Stable Cascade's over
        ``[image; clip]``) or the same sequence as the keys (MM-DiT)."""
        before, after = self.state.extra_keys, self.state.keys_after
        added = before + after
        n_text = self.state.n_keys or (n_key - n_hidden - added if self.kind == "joint" else self.state.text_len)
        if self.kind == "cross" or (n_text == n_key and n_query != n_key):  # text keys alone (only_cross_attention)
            return slice(0, n_query), slice(0, 0), slice(0, n_key)
        n_image = n_key - n_text - added
        if n_text <= 0 or n_image <= 0 or n_query not in (n_key, n_image):
            raise ProbeError(
                f"site {self.site}: its attention has {n_query} queries and {n_key} keys, which is not one sequence of "
                f"{n_text} text, {added} added and {n_image} image positions; attnprobe cannot tell the text keys apart"
            )
        start = 0 if self.text_first else n_image  # where the [before; text; after] block begins
        text = slice(start + before, start + before + n_text)
        image = slice(added + n_text, n_key) if self.text_first else slice(0, n_image)
        queries = image if n_query == n_key else slice(0, n_query)
        if self.state.image_len and not self.text_first:  # HiDream pads its image stream: pad keys, no pad queries
            queries = slice(0, self.state.image_len)
        if not added:
            return queries, image, text
        # the added keys share the softmax with the image keys
        others = torch.cat([torch.arange(start, start + before), torch.arange(text.stop, text.stop + after),
                            torch.arange(image.start, image.stop)])
        return queries, others, text

    def _check_kernel(self, query, key, mask, scale, seen, queries: slice = slice(None)) -> None:
        """Verify once: the kernel's output against ``softmax(q·kᵀ·scale + mask)·v`` of every batch row, for the
        ``queries`` positions (default all; HunyuanVideo 1.5: the image's, as its masked text queries attend to no
        key)."""
        self.checked = True
        out = seen["output"][:, :, queries]
        every = slice(0, key.shape[2])
        with torch.no_grad():
            full = None if mask is None else sequence_bias(mask, None, queries, every)
            bias = None if full is None else (full, full[..., :0])
            error = joint_output_error(query[:, :, queries].float() * scale, key, key[:, :, :0], seen["value"],
                                       seen["value"][:, :, :0], out.transpose(1, 2).flatten(2), bias=bias)
        self.state.checks.append((self.site, type(self.innermost()).__name__, *with_tolerance(error, out.dtype), None))

    def __repr__(self) -> str:
        return f"KernelProbeProcessor(site={self.site!r}, kind={self.kind!r}, inner={self.inner!r})"
