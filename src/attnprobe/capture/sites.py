"""Find the cross-attention sites of a diffusers denoiser.

A *site* is one attention layer whose keys are text tokens, named by its module path in the denoiser
(exactly what ``denoiser.named_modules()`` and ``print(denoiser)`` show).

    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> sites = list_sites(tiny_sd_pipeline())
    >>> sites[0].name, len(sites)
    ('down_blocks.0.attentions.0.transformer_blocks.0.attn2', 16)
"""

from __future__ import annotations

import fnmatch
import weakref
from typing import Callable, Iterable, Union

import torch

from ..errors import NoSitesError, UnknownSiteError
from ..store.records import Site
from .families import family_of
from .kinds import is_attention, site_kind

__all__ = ["list_sites", "select_sites", "denoiser_of", "SiteSelector", "DENOISER_ATTRS"]

#: the pipeline attributes that hold its denoiser, in the order they are looked for (Stable Cascade's and Würstchen's
#: pipelines: ``prior`` or ``decoder``)
DENOISER_ATTRS = ("unet", "transformer", "prior", "decoder")

# Execution order observed by a probe, per denoiser (weak: forgotten with the model). A cache of a fact
# about the model, not a store of captured data.
_OBSERVED_ORDER: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, ...]]" = weakref.WeakKeyDictionary()

SiteSelector = Union[None, str, Iterable[str], Callable[["Site"], bool]]


def denoiser_of(pipe_or_denoiser) -> torch.nn.Module:
    """The denoiser of a pipeline (its first of ``DENOISER_ATTRS``: ``pipe.unet``, ``pipe.transformer``, …), or the
    module itself; the module inside ``torch.compile``'s wrapper when compiled that way.

    Raises:
        NoSitesError: the object is neither a pipeline with a denoiser nor a ``torch.nn.Module``.
    """
    if isinstance(pipe_or_denoiser, torch.nn.Module):
        return _uncompiled(pipe_or_denoiser)
    for attr in DENOISER_ATTRS:
        module = getattr(pipe_or_denoiser, attr, None)
        if isinstance(module, torch.nn.Module):
            return _uncompiled(module)
    if isinstance(getattr(pipe_or_denoiser, "transformer_2", None), torch.nn.Module):
        raise NoSitesError(
            f"{type(pipe_or_denoiser).__name__} has only its transformer_2 (Wan 2.2's low-noise expert; transformer is "
            "None): attnprobe records Wan 2.2 with both experts loaded, or a single-transformer pipeline (Wan 2.1)"
        )
    raise NoSitesError(
        f"{type(pipe_or_denoiser).__name__} is neither a torch.nn.Module nor a pipeline with a denoiser "
        f"(looked for {', '.join('.' + a for a in DENOISER_ATTRS)}): pass a diffusers pipeline or its denoiser."
    )


def _uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``torch.compile(module)``'s wrapper (its hooks and processors run in the compiled
    forward; site names stay those of ``print(module)``)."""
    return getattr(module, "_orig_mod", module) if type(module).__name__ == "OptimizedModule" else module


def _group_and_block(name: str) -> tuple[str, str]:
    parts = name.split(".")
    head = parts[0]
    group = head.removesuffix("_blocks").removesuffix("_block")
    if len(parts) > 1 and parts[1].isdigit():
        return group, f"{head}.{parts[1]}"
    return group, head


def list_sites(pipe_or_denoiser) -> list[Site]:
    """The cross-attention sites of a pipeline's denoiser (or of a denoiser module).

    A site is a ``diffusers`` attention module whose image queries see text keys, decided from the module's
    structure (``attnprobe.capture.kinds.site_kind``), not its name, among the kinds of its family
    (``attnprobe.capture.families``): ``kind="cross"`` for cross-attention (``is_cross_attention``:
    the ``attn2`` layers of SD 1.x/2.x/SDXL UNets and PixArt), ``"joint"`` for joint attention with added text
    projections (SD3's and Flux's double-stream ``attn``), ``"single"`` for Flux's single-stream blocks (one
    ``[text; image]`` sequence). Image self-attention (UNet ``attn1``, SD3.5's ``attn2``) is not a site.

    Args:
        pipe_or_denoiser: a diffusers pipeline (its ``unet``/``transformer`` is used) or the denoiser module.

    Returns:
        The sites in execution order: as a probe saw it in one denoiser call (``Site.order`` set), or before
        that in ``named_modules()`` order with a UNet's ``mid_block`` sites moved between ``down_blocks`` and
        ``up_blocks`` (``named_modules()`` lists ``up_blocks`` first; ``Site.order`` is ``None``).

    Raises:
        NoSitesError: the denoiser has no cross-attention layer (says what attention layers it has).

    Examples:
        >>> from attnprobe.testing import tiny_sd_pipeline
        >>> [s.group for s in list_sites(tiny_sd_pipeline())][:3]
        ['down', 'down', 'down']
    """
    denoiser = denoiser_of(pipe_or_denoiser)
    family = family_of(denoiser)
    found, other = [], 0
    observed = _OBSERVED_ORDER.get(denoiser)
    rank = {n: i for i, n in enumerate(observed)} if observed else {}
    modules = dict(denoiser.named_modules())
    for name, module in modules.items():
        if not is_attention(module):
            continue
        kind = site_kind(module, modules.get(name.rpartition(".")[0]) if "." in name else None)
        if kind is None and family.single_blocks and name.startswith(family.single_blocks + "."):
            kind = "single"  # a block handed the joined sequence as its hidden_states (AuraFlow)
        if family.site_kind is not None:
            kind = family.site_kind(denoiser, name, kind)
        if kind is None or kind not in family.kinds:
            other += 1
            continue
        group, block = _group_and_block(name)
        heads = int(module.heads if hasattr(module, "heads") else module.num_heads)  # Kandinsky 5: num_heads
        inner = getattr(module, "inner_dim", None) or getattr(getattr(module, "to_query", None), "out_features", 0)
        head_dim = int(inner // heads) if inner else 0
        found.append(Site(name=name, kind=kind, heads=heads, head_dim=head_dim, group=group, block=block,
                          order=rank.get(name)))
    if family.single_needs_joint and found and not any(s.kind == "joint" for s in found):
        # a block called with encoder_hidden_states whose only attention is image self-attention (a class-
        # conditional DiT's attn1, attn2 being None) is single-stream only in an MM-DiT, next to joint blocks
        other += sum(s.kind == "single" for s in found)
        found = [s for s in found if s.kind != "single"]
    if not found:
        raise NoSitesError(
            f"{type(denoiser).__name__} has no cross-attention site ({other} self-attention layers, "
            "0 with encoder states): attnprobe records attention from image positions to text tokens, "
            "so it needs a text-conditioned denoiser."
        )
    found = family.order(denoiser, found)
    if rank:
        found.sort(key=lambda s: (s.order is None, s.order if s.order is not None else 0))
    return found


def select_sites(sites: list[Site], selector: SiteSelector) -> list[Site]:
    """The sites a selector picks, keeping the order of ``sites``.

    Args:
        sites: the candidates (from ``list_sites``).
        selector: ``None`` (all), a name or glob (``"up_blocks.*"``, ``"*attn2"``), a ``Site``, a list of
            names/globs/Sites (their union), or a predicate ``Site -> bool``.

    Raises:
        UnknownSiteError: a name or glob matched nothing (the message lists the sites there are), or the
            selector is of another type.
        NoSitesError: a predicate picked no site, or the list is empty.
    """
    if selector is None:
        return list(sites)
    if callable(selector) and not isinstance(selector, str):
        picked = [s for s in sites if selector(s)]
        if not picked:
            raise NoSitesError(f"the site predicate {selector!r} picked none of the {len(sites)} sites")
        return picked
    if isinstance(selector, Site):
        selector = selector.name
    if not isinstance(selector, str) and not isinstance(selector, Iterable):
        raise UnknownSiteError(
            f"sites={selector!r} ({type(selector).__name__}) is not a name, glob, list of them, Site or predicate"
        )
    patterns = [selector] if isinstance(selector, str) else [p.name if isinstance(p, Site) else p for p in selector]
    if not patterns:
        raise NoSitesError(f"the site selection is empty; there are {len(sites)} sites (sites=None takes all)")
    keep = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise UnknownSiteError(f"site patterns must be strings; got {pattern!r} ({type(pattern).__name__})")
        hits = {s.name for s in sites if s.name == pattern or fnmatch.fnmatchcase(s.name, pattern)}
        if not hits:
            shown = "\n  ".join(s.name for s in sites[:40])
            more = f"\n  … and {len(sites) - 40} more" if len(sites) > 40 else ""
            raise UnknownSiteError(
                f"site pattern {pattern!r} matches none of the {len(sites)} sites:\n  {shown}{more}"
            )
        keep |= hits
    return [s for s in sites if s.name in keep]


def record_order(denoiser: torch.nn.Module, names: list[str]) -> None:
    """Remember the execution order of a denoiser's cross-attention sites (every site, seen in one call)."""
    if names:
        _OBSERVED_ORDER[denoiser] = tuple(names)
