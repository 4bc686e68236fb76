"""Kandinsky 3 (``Kandinsky3UNet``): a UNet whose down and up blocks of the three lower resolutions hold cross-attention
blocks (``…_blocks.L.attentions.i.attention``, ``i ≥ 1``) over the T5 encoder's positions. Its image self-attention
(``attentions.0`` of those blocks) and the pooling of the text into the time embedding (``add_time_condition``) are
built as ``Attention`` with a ``cross_attention_dim`` as well, so structure alone would take them for cross-attention:
the family leaves them out (``site_kind``).

Text keys: T5's positions up to one past the longest attended prompt of the batch (the pipeline cuts the rest,
``cut_context``), through the UNet's text projection; the mask is added to the logits as the UNet makes it
(``(1 − mask) · −10000``), so padded positions get about 0 and, for the default empty negative prompt (zero
embeddings, all masked), every position the same shift. The batch is ``[uncond, cond]``.
"""

from __future__ import annotations

import torch

from .registry import Family, first_text_encoder


def _site_kind(denoiser: torch.nn.Module, name: str, kind: str | None) -> str | None:
    # a site is ``<down|up>_blocks.L.attentions.i.attention`` with i ≥ 1 in a block built with a context
    parts = name.split(".")
    if len(parts) != 5 or parts[0] not in ("down_blocks", "up_blocks") or parts[2] != "attentions":
        return None
    block = denoiser.get_submodule(".".join(parts[:2]))
    return None if int(parts[3]) == 0 or getattr(block, "context_dim", None) is None else kind


FAMILY = Family(
    name="kandinsky3",
    title="Kandinsky 3 (Kandinsky3UNet)",
    denoisers=("Kandinsky3UNet",),
    kinds=("cross",),
    text_streams=first_text_encoder,
    site_kind=_site_kind,
)
