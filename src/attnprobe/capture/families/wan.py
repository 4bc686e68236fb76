"""Wan 2.1 text-to-video (``WanTransformer3DModel`` in ``WanPipeline``): each block's ``attn2`` cross-attends from the
video's patch tokens (``[batch, channel, frame, h, w]`` latents in ``(1, 2, 2)`` patches: ``qt × qh × qw`` queries in
``(t, h, w)`` order) to UMT5's positions, after ``norm_q``/``norm_k`` (RMS norm across heads) and without a rotary
embedding, read at the kernel. Wan pads its text with zero vectors past each prompt's length, without a mask: the
padded keys get attention like the others and are on the ``token`` axis as ``pad``. The passes run as separate
denoiser calls (the prompt's first).

Wan 2.2's text-to-video pipeline (``WanPipeline`` with ``transformer_2`` and ``boundary_ratio``) runs two experts of
this structure, the high-noise ``transformer`` on the calls whose timestep is at least the boundary and the low-noise
``transformer_2`` on the rest: a probe of the pipeline records both into one store (``capture.experts``); a probe of
one expert alone is refused at its first call (``refuse_lone_expert``), as its call count would not be the pipeline's.

``SKYREELS_V2`` is SkyReels-V2's text-to-video denoiser, the same reading. Refused here: Wan 2.1's and SkyReels-V2's
image-to-video denoisers (``image_dim``: ``attn2`` also attends to CLIP image tokens, a second softmax whose output is
added) are ``refused.WAN_IMAGE``."""

import sys
from dataclasses import replace

from ...errors import ProbeError
from .registry import Family, first_text_encoder

__all__ = ["FAMILY", "SKYREELS_V2", "refuse_lone_expert"]


def _frames(denoiser, sample):
    """Latent frames of ``[batch, channel, frame, h, w]`` and the ``(pt, ph, pw)`` patch."""
    return int(sample.shape[2]), tuple(int(p) for p in denoiser.config.patch_size)


def _two_experts(pipe):
    first, second = getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)
    if second is not None and type(second) is not type(first):
        return (f"its transformer_2 (Wan 2.2's low-noise expert) is a {type(second).__name__} and its transformer a "
                f"{type(first).__name__}: attnprobe records two experts of one class, whose sites share their names")
    return None


def _two_expert_pipeline(pipe) -> bool:
    return (getattr(pipe, "transformer_2", None) is not None
            and getattr(getattr(pipe, "config", None), "boundary_ratio", None) is not None)


def refuse_lone_expert(pipe, denoiser) -> None:
    """Raise ``ProbeError`` when ``denoiser``, probed on its own, is one of the two experts of a Wan 2.2 pipeline
    (``transformer_2`` and ``boundary_ratio`` set) that is driving it: the other expert runs the other denoiser calls
    of the pipeline call, which such a probe neither counts nor records. ``pipe``: the pipeline found driving it, or
    ``None`` (then the call stack is searched for a pipeline call whose ``transformer`` or ``transformer_2`` it is)."""
    owner = pipe if pipe is not None and _two_expert_pipeline(pipe) else None
    frame = sys._getframe(1) if pipe is None else None  # a bare denoiser: whichever pipeline call drives it
    try:
        while frame is not None and owner is None:
            me = frame.f_locals.get("self") if frame.f_code.co_name == "__call__" else None
            if me is not None and _two_expert_pipeline(me) and (
                    getattr(me, "transformer", None) is denoiser or me.transformer_2 is denoiser):
                owner = me
            frame = frame.f_back
    finally:
        del frame
    if owner is None or denoiser not in (owner.transformer, owner.transformer_2):
        return
    name = "transformer" if denoiser is owner.transformer else "transformer_2"
    raise ProbeError(
        f"the probed denoiser is {type(owner).__name__}.{name}, one of Wan 2.2's two experts (boundary_ratio="
        f"{owner.config.boundary_ratio}): the other expert runs the rest of the pipeline call's denoiser calls, which a "
        "probe of this one would neither count nor record. Probe the pipeline (attnprobe.probe(pipe)): its store holds "
        "every call, each from the expert that ran it (store.meta['experts'])"
    )


FAMILY = Family(
    name="wan",
    title="Wan 2.1 and 2.2 text-to-video (WanTransformer3DModel)",
    denoisers=("WanTransformer3DModel",),
    kinds=("cross",),
    text_streams=first_text_encoder,
    reader="kernel",
    video=_frames,
    pipe_refused=_two_experts,
)

#: SkyReels-V2 text-to-video (``SkyReelsV2Transformer3DModel`` in ``SkyReelsV2Pipeline``): Wan 2.1's blocks, latents
#: and UMT5 keys (its attn2 processor computes what Wan's does), so Wan's reading; its diffusion-forcing pipelines,
#: which give each latent frame its own timestep, are refused by name (``capture.passes.REFUSED``)
SKYREELS_V2 = replace(FAMILY, name="skyreels-v2", title="SkyReels-V2 text-to-video (SkyReelsV2Transformer3DModel)",
                      denoisers=("SkyReelsV2Transformer3DModel",), pipe_refused=None)
