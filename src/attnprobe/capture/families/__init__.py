"""Denoiser families: one file per family says how to find its sites, which encoders give its text keys, and which
site kinds (so how q and k are read) it has. ``family_of`` picks a denoiser's family.

    >>> from attnprobe.testing import tiny_flux_pipeline
    >>> family_of(tiny_flux_pipeline().transformer).name
    'flux'

To add a family: a file here with its ``FAMILY = Family(...)`` (``registry.Family``), a line in ``FAMILIES``, and a
tiny builder in ``attnprobe.models`` for its tests (docs/architecture.md).
"""

from __future__ import annotations

import torch

from . import auraflow, cogview4, deepfloyd, flux, flux2, generic, hunyuandit, lumina2, pixart, qwen, sana, sd3, unet
from .registry import Family

__all__ = ["Family", "FAMILIES", "GENERIC", "family_of"]

#: The known families, in the order they are tried.
FAMILIES: tuple[Family, ...] = (deepfloyd.FAMILY, unet.FAMILY, sd3.FAMILY, flux.FAMILY, pixart.FAMILY, qwen.FAMILY,
                                  sana.FAMILY, flux2.FAMILY, cogview4.FAMILY,
                                  hunyuandit.FAMILY, auraflow.FAMILY, lumina2.FAMILY)
#: The family of every other denoiser: sites from structure alone.
GENERIC: Family = generic.FAMILY


def family_of(denoiser: torch.nn.Module) -> Family:
    """The family of a denoiser module (``attnprobe.capture.sites.denoiser_of`` finds a pipeline's): the first of
    ``FAMILIES`` that covers its class, else ``GENERIC``."""
    return next((f for f in FAMILIES if f.covers(denoiser)), GENERIC)
