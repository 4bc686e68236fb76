"""Denoiser families: one file per family says how to find its sites, which encoders give its text keys, and which
site kinds (so how q and k are read) it has. ``family_of`` picks a denoiser's family; ``checked_family`` refuses,
before a pipeline runs, a denoiser attnprobe does not record (``refused``) or has no family for (generic).

    >>> from attnprobe.testing import tiny_flux_pipeline
    >>> family_of(tiny_flux_pipeline().transformer).name
    'flux'

To add a family: a file here with its ``FAMILY = Family(...)`` (``registry.Family``), a line in ``FAMILIES``, and a
tiny builder in ``attnprobe.models`` for its tests (docs/architecture.md).
"""

from __future__ import annotations

import weakref

import torch

from ...errors import ProbeError, warn
from . import (allegro, animatediff, auraflow, bria, cascade, cogview3, cogvideox, cogview4, deepfloyd, flux, flux2, generic, hidream, hunyuandit, hunyuanimage,
               hunyuanvideo, hunyuanvideo15,
               kandinsky3, kandinsky5, longcat, ltx, lumina, lumina2, mochi, ovis, pixart, prx, qwen, refused, sana, sana_video, sd3, unet, wan, zimage)
from .registry import Family

__all__ = ["Family", "FAMILIES", "REFUSED_FAMILIES", "GENERIC", "family_of", "checked_family"]

#: The known families, in the order they are tried.
FAMILIES: tuple[Family, ...] = (deepfloyd.FAMILY, unet.FAMILY, sd3.FAMILY, flux.FAMILY, pixart.FAMILY, qwen.FAMILY,
                                  sana.FAMILY, flux2.FAMILY, cogview4.FAMILY,
                                  hunyuandit.FAMILY, auraflow.FAMILY, lumina2.FAMILY, zimage.FAMILY,
                                  kandinsky3.FAMILY, hidream.FAMILY, hunyuanimage.FAMILY, cascade.FAMILY,
                                  cogview3.FAMILY, lumina.FAMILY, bria.FAMILY, ovis.FAMILY, prx.FAMILY,
                                  longcat.FAMILY, wan.FAMILY, wan.SKYREELS_V2, cogvideox.FAMILY,
                                  hunyuanvideo.FAMILY, ltx.FAMILY, allegro.FAMILY, sana_video.FAMILY,
                                  mochi.FAMILY, hunyuanvideo15.FAMILY, kandinsky5.FAMILY, animatediff.FAMILY)
#: Denoisers refused by what they are (video, audio, CLIP-embedding priors, Stable Cascade's decoder), tried before
#: ``FAMILIES``.
REFUSED_FAMILIES: tuple[Family, ...] = refused.FAMILIES
#: The family of every other denoiser: sites from structure alone.
GENERIC: Family = generic.FAMILY


#: each denoiser's family, found once: a family's ``matches`` walks the denoiser's modules (DeepFloyd IF's added-KV
#: layers), about 2 ms on SD 1.5's layout, and a probe asks at every pipeline call
_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def family_of(denoiser: torch.nn.Module) -> Family:
    """The family of a denoiser module (``attnprobe.capture.sites.denoiser_of`` finds a pipeline's): the first of
    ``REFUSED_FAMILIES`` then ``FAMILIES`` that covers its class, else ``GENERIC``."""
    found = _FOUND.get(denoiser)
    if found is None or found[0] is not type(denoiser):  # the same module (its class, whose structure decides)
        found = (type(denoiser), next((f for f in REFUSED_FAMILIES + FAMILIES if f.covers(denoiser)), GENERIC))
        _FOUND[denoiser] = found
    return found[1]


def checked_family(pipe, denoiser: torch.nn.Module, allow_generic: bool = False) -> Family:
    """The denoiser's family, if attnprobe records it.

    Args:
        pipe: the pipeline (or the denoiser itself), for the message. denoiser: its denoiser module.
        allow_generic: record a denoiser no family covers from its structure alone (sites by structure, text keys
            by the generic rules, nothing of it checked against a reference); a warning says so.

    Raises:
        ProbeError: the family is refused (video, audio, a prior, Stable Cascade's decoder: ``Family.refused``), the
            pipeline is (Wan 2.2's two experts: ``Family.pipe_refused``), or no family covers the denoiser and
            ``allow_generic`` is not set; names the pipeline, its denoiser and why.
    """
    family = family_of(denoiser)
    what = type(denoiser).__name__
    what = what if pipe is denoiser else f"{type(pipe).__name__} (denoiser {what})"
    if family.refused:
        raise ProbeError(f"{what} is {family.title}: attnprobe does not record it, because {family.refused}")
    why = family.pipe_refused(pipe) if family.pipe_refused is not None and pipe is not denoiser else None
    if why:
        raise ProbeError(f"{what} is {family.title}, but attnprobe does not record this pipeline: {why}")
    if family is GENERIC:
        if not allow_generic:
            known = ", ".join(f.name for f in FAMILIES)
            raise ProbeError(
                f"{what}: no attnprobe family covers {type(denoiser).__name__}, so where its text keys sit and how "
                f"its attention reads q and k are unchecked, and attnprobe refuses rather than guess. Families: {known} "
                "(docs/pipelines.md lists every pipeline). To record it from its structure anyway, labels unchecked, "
                "pass allow_generic=True"
            )
        warn(f"{what} is recorded from its structure alone (allow_generic=True): its sites, text-key labels and "
             "maps follow the generic rules and are not checked against a reference for this denoiser")
    return family
