"""Wan 2.1 text-to-video (``WanTransformer3DModel`` in ``WanPipeline``): each block's ``attn2`` cross-attends from the
video's patch tokens (``[batch, channel, frame, h, w]`` latents in ``(1, 2, 2)`` patches: ``qt × qh × qw`` queries in
``(t, h, w)`` order) to UMT5's positions, after ``norm_q``/``norm_k`` (RMS norm across heads) and without a rotary
embedding, read at the kernel. Wan pads its text with zero vectors past each prompt's length, without a mask: the
padded keys get attention like the others and are on the ``token`` axis as ``pad``. The passes run as separate
denoiser calls (the prompt's first).

``SKYREELS_V2`` is SkyReels-V2's text-to-video denoiser, the same reading. Refused here: Wan 2.2's two-expert pipelines (``transformer_2``, the low-noise expert, a second denoiser);
Wan 2.1's and SkyReels-V2's image-to-video denoisers (``image_dim``: ``attn2`` also attends to CLIP image tokens, a second softmax
whose output is added) are ``refused.WAN_IMAGE``."""

from dataclasses import replace

from .registry import Family, first_text_encoder


def _frames(denoiser, sample):
    """Latent frames of ``[batch, channel, frame, h, w]`` and the ``(pt, ph, pw)`` patch."""
    return int(sample.shape[2]), tuple(int(p) for p in denoiser.config.patch_size)


def _two_experts(pipe):
    if getattr(pipe, "transformer_2", None) is not None:
        return ("its transformer_2 (Wan 2.2's low-noise expert) is a second denoiser that runs the calls below the "
                "boundary timestep, which a probe of the transformer would miss. Probe a single-transformer Wan "
                "pipeline (Wan 2.1)")
    return None


FAMILY = Family(
    name="wan",
    title="Wan 2.1 text-to-video (WanTransformer3DModel)",
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
