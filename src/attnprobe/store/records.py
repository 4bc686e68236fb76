"""The coordinates of a store: its sites, its denoiser calls and its samples (the ``site``, ``call`` and ``sample``
axes of the maps). Plain frozen records, saved in a store's JSON header.

    >>> Sample(0, "cond", 0, 0, 1, "a dog")
    Sample(index=0, pass_label='cond', prompt_index=0, image_index=0, row=1, text='a dog')
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Site", "Call", "Sample", "RELATIONS"]

#: the relations a store may hold beside its maps (``probe(relations=...)``, ``attnprobe.capture.relations``)
RELATIONS = ("image->image", "text->image", "text->text")


@dataclass(frozen=True)
class Site:
    """One cross-attention layer of a denoiser.

    Attributes:
        name: module path in the denoiser, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2``.
        kind: ``"cross"`` (queries are image positions, keys are text tokens), ``"joint"`` (one softmax over image
            and text keys; the map is its image-query × text-key block, see ``attnprobe.capture.joint``) or ``"single"``
            (Flux single-stream: the same over one ``[text; image]`` sequence).
        heads: number of attention heads.
        head_dim: channels per head (query/key width divided by ``heads``).
        group: block group: ``"down"``, ``"mid"``, ``"up"`` for UNets, ``"transformer"`` /
            ``"single_transformer"`` for DiTs (the first path component without ``_blocks``/``_block``).
        block: the block the site lives in, e.g. ``"down_blocks.1"`` or ``"mid_block"``.
        order: position in execution order, or ``None`` until a probe has seen one denoiser call.
    """

    name: str
    kind: str
    heads: int
    head_dim: int
    group: str
    block: str
    order: int | None = None


@dataclass(frozen=True)
class Call:
    """One denoiser call.

    Attributes:
        index: call index from 0, counted by a pre-forward hook on the denoiser (Heun makes 2 per step).
        timestep: the scheduler timestep the denoiser got (its first element when it is per sample).
        generation: which pipeline call (0 for the first) within the probe.
        layout: the pass label of every batch row of the call, e.g. ``("uncond", "uncond", "cond", "cond")``.
    """

    index: int
    timestep: float
    generation: int
    layout: tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    """One captured batch row (the ``sample`` axis of the maps).

    Attributes:
        index: position on the ``sample`` axis.
        pass_label: ``"cond"`` or ``"uncond"`` (classifier-free guidance's conditional / unconditional pass).
        prompt_index: which prompt of the pipeline call (``prompt[i]`` or ``negative_prompt[i]``).
        image_index: which image of that prompt (``num_images_per_prompt``).
        row: the batch row in the denoiser call.
        text: the prompt text, or ``None`` when unknown (``prompt_embeds`` passed).
    """

    index: int
    pass_label: str
    prompt_index: int
    image_index: int
    row: int
    text: str | None
