"""Site kinds: which attention a module computes from image positions to text keys (decided from its structure), and
the recording wrapper of each kind.

    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> unet = tiny_sd_pipeline().unet
    >>> [site_kind(unet.get_submodule(f"mid_block.attentions.0.transformer_blocks.0.{n}"), None) for n in ("attn1", "attn2")]
    [None, 'cross']

| kind | where | the map |
|---|---|---|
| ``cross`` | ``is_cross_attention``: UNet ``attn2`` (SD 1.x/2.x, SDXL), PixArt ``attn2`` | ``softmax(q·kᵀ·scale + mask)``, ``attnprobe.capture.cross`` |
| ``joint`` | added text projections (``add_k_proj``): SD3's and Flux's double-stream ``attn`` | the image × text block of one softmax over ``[image; text]`` keys, ``attnprobe.capture.joint`` |
| ``single`` | a self-attention whose block takes ``encoder_hidden_states``: Flux's single-stream blocks | the same over one ``[text; image]`` sequence |
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from ..errors import ProbeError
from .cross import ProbeProcessor, chain
from .families import Family
from .joint import JointProbeProcessor
from .kernel import KernelProbeProcessor
from .processor import CaptureState

__all__ = ["KINDS", "WRAPPERS", "site_kind", "is_attention", "attention_classes", "set_processor", "wrap_processor",
           "restore_processor"]

#: The recording wrapper of each site kind.
WRAPPERS: dict[str, type[ProbeProcessor]] = {"cross": ProbeProcessor, "joint": JointProbeProcessor,
                                              "single": JointProbeProcessor}
KINDS = tuple(WRAPPERS)


def site_kind(module: torch.nn.Module, parent: torch.nn.Module | None) -> str | None:
    """What attention a module computes from image positions to text keys, from its structure.

    Returns:
        ``"joint"`` (added text projections: ``add_k_proj`` or a fused ``to_added_qkv``; SD3's, Flux's, and DeepFloyd
        IF's added-KV cross-attention, whose keys are ``[text; image]``), ``"cross"`` (keys are the encoder states
        alone: ``is_cross_attention``), ``"single"`` (a self-attention whose block is called with
        ``encoder_hidden_states``, or that has no output projection of its own (``pre_only``), and holds no other
        text attention: Flux's and Chroma's single-stream blocks, which attend over
        ``[text; image]``; ``list_sites`` keeps these only in a denoiser that also has joint sites), or ``None``
        (image self-attention: UNet ``attn1``, SD3.5's ``attn2``).
    """
    if getattr(module, "add_k_proj", None) is not None or getattr(module, "to_added_qkv", None) is not None:
        return "joint"  # text projections of its own: one softmax over text and image keys (also IF's added-KV)
    if getattr(module, "is_cross_attention", False):
        return "cross"
    if parent is None:
        return None
    forward = parent.forward
    takes_text = _takes_text(getattr(forward, "__func__", forward))  # the function, not a new bound method
    if takes_text is None:
        return None
    # Chroma's single-stream blocks get the [text; image] sequence already joined: their attention has no output
    # projection of its own (pre_only: the block projects it together with its MLP), as Flux's does
    takes_text = takes_text or bool(getattr(module, "pre_only", False))
    # another text attention in the block (a UNet block's attn2 beside its attn1) makes this one image self-attention;
    # any() stops at the first, a few modules into the block
    if takes_text and not any(
        m is not module and is_attention(m)
        and (getattr(m, "is_cross_attention", False) or getattr(m, "add_k_proj", None) is not None)
        for m in parent.modules()
    ):
        return "single"
    return None


@functools.lru_cache(maxsize=512)
def _takes_text(forward) -> bool | None:
    """Whether a block's ``forward`` takes ``encoder_hidden_states`` (``None``: no signature to read); once per
    function, as ``inspect.signature`` costs ~15 µs and a probe asks for every attention module."""
    try:
        return "encoder_hidden_states" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None


#: diffusers attention classes that are plain ``torch.nn.Module``s with a ``processor`` (neither ``Attention`` nor
#: ``AttentionModuleMixin``), by their names in ``diffusers.models.attention_processor``: Mochi 1's
PLAIN_ATTENTION = ("MochiAttention",)


@functools.cache
def attention_classes() -> tuple[type, ...]:
    """diffusers' attention module classes: ``Attention``, where the installed diffusers has them the
    ``AttentionModuleMixin`` of its newer per-model attention classes (``FluxAttention``) and ``PLAIN_ATTENTION``."""
    from diffusers.models import attention_processor

    classes = [attention_processor.Attention]
    try:
        from diffusers.models.attention import AttentionModuleMixin
        classes.append(AttentionModuleMixin)
    except ImportError:  # pragma: no cover - diffusers without the mixin
        pass
    classes += [c for c in (getattr(attention_processor, n, None) for n in PLAIN_ATTENTION) if isinstance(c, type)]
    return tuple(classes)


def is_attention(module) -> bool:
    """Whether a module is a diffusers attention module with a processor (a candidate site)."""
    return isinstance(module, attention_classes()) and hasattr(module, "processor")


def set_processor(attn, processor) -> None:
    """Install ``processor`` on an attention module: its ``set_processor`` where it has one, else (``PLAIN_ATTENTION``,
    whose ``forward`` calls ``self.processor``) the attribute itself."""
    if hasattr(attn, "set_processor"):
        attn.set_processor(processor)
    else:
        attn.processor = processor


def restore_processor(attn, wrapper: ProbeProcessor, original) -> None:
    """Take a probe's ``wrapper`` off ``attn``: ``original`` back in its place (past the wrappers of outer probes that
    closed first), or, when a probe opened inside this one still wraps it, ``original`` under that probe's wrapper."""
    wrapper.remove_hooks()
    while isinstance(original, ProbeProcessor) and original.removed:  # an outer probe closed first
        original = original.inner
    if attn.processor is wrapper:
        set_processor(attn, original)
        return
    for outer in chain(attn.processor):  # a probe opened inside this one is still installed
        if isinstance(outer, ProbeProcessor) and outer.inner is wrapper:
            outer.inner = original
            return


def wrap_processor(inner: Any, site: str, attn, state: CaptureState, kind: str = "cross",
                   family: Family | None = None) -> ProbeProcessor:
    """The recording wrapper of a site of this ``kind`` (``WRAPPERS``: ``cross.ProbeProcessor`` or
    ``joint.JointProbeProcessor``; ``kernel.KernelProbeProcessor`` for a ``family`` read at the kernel) around its
    processor ``inner``, whose ``__call__`` shows ``inner``'s signature.

    ``Attention.forward`` drops every ``cross_attention_kwargs`` entry that its processor's ``__call__`` does
    not name (e.g. IP-Adapter's ``ip_adapter_masks``), so the wrapper must name exactly what ``inner`` names.
    """
    if kind not in WRAPPERS:
        raise ProbeError(f"site {site}: attnprobe records sites of kinds {sorted(WRAPPERS)}, not {kind!r}")
    if family is not None and family.reader == "kernel":
        return _wrapper_class(inner, KernelProbeProcessor)(inner, site, attn, state, kind, family.text_first)
    wrapper = _wrapper_class(inner, WRAPPERS[kind])
    return wrapper(inner, site, attn, state) if kind == "cross" else wrapper(inner, site, attn, state, kind)


_CLASSES: dict = {}
_SEEN: dict = {}  # (base, processor class's __call__, processor class) -> its wrapper class


def _wrapper_class(inner: Any, base: type) -> type:
    """One wrapper class per signature of the wrapped processors (cached), so that every site of a model, and
    every probe opened on it, has the same processor type: ``torch.compile`` guards on the processor's type and
    would recompile ``Attention.forward`` for each new class."""
    call = inner if inspect.isfunction(inner) else getattr(type(inner), "__call__", None)
    seen = (base, call, type(inner))
    if seen in _SEEN:  # the signature read once per processor class (~40 µs a site, at every probe)
        return _SEEN[seen]
    sig = inspect.signature(inner.__call__ if not inspect.isfunction(inner) else inner)
    key = (base.__name__, type(inner).__name__, tuple((p.name, p.kind, repr(p.default)) for p in sig.parameters.values()))
    if key not in _CLASSES:
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *sig.parameters.values()]

        def __call__(self, *args, **kwargs):
            return base.__call__(self, *args, **kwargs)

        __call__.__signature__ = inspect.Signature(params)
        _CLASSES[key] = type(f"Probe{type(inner).__name__}", (base,), {"__call__": __call__})
    if inspect.isfunction(call) and "__call__" not in getattr(inner, "__dict__", {}):
        _SEEN[seen] = _CLASSES[key]  # a class's Python __call__: one signature for all its instances (not a partial's)
    return _CLASSES[key]
