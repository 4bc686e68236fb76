"""Allegro (``AllegroTransformer3DModel`` in ``AllegroPipeline``): each block's ``attn2`` cross-attends from the
video's patch tokens to T5's positions (projected by ``caption_projection``), read at the kernel. The latents are
``[batch, channel, frame, h, w]``; each latent frame is cut into ``patch_size × patch_size`` patches (``PatchEmbed``
per frame: no temporal patch), so the queries are ``qt × qh × qw`` in ``(t, h, w)`` order with ``qt`` the latent
frames. ``attn2`` has no q/k norm and no rotary embedding (the 3-D rotary embedding is ``attn1``'s, self-attention);
the pipeline's T5 padding mask reaches its kernel as an additive bias of −10000 on the padded keys, so their
probability is ``exp(−10000)``-small (0 in fp32) and each query's values sum to 1 over the ``token`` axis. Guidance
batches ``[uncond, cond]`` in one call.

Refused (``pipe_refused``): a transformer built with ``patch_size_t`` other than 1, whose patch embedding still cuts
every latent frame while its output is unpatchified in groups of ``patch_size_t`` frames (diffusers' Allegro models
all have 1).
"""

from .registry import Family, first_text_encoder


def _frames(denoiser, sample):
    """Latent frames of ``[batch, channel, frame, h, w]`` and the ``(1, p, p)`` patch of its per-frame embedding."""
    p = int(denoiser.config.patch_size)
    return int(sample.shape[2]), (1, p, p)


def _temporal_patch(pipe):
    pt = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size_t", 1)
    if pt != 1:
        return (f"its transformer has patch_size_t={pt}, but AllegroTransformer3DModel's patch embedding cuts every "
                "latent frame alone (one query per frame and patch) while its output is unpatchified in groups of "
                f"{pt} frames: which frames a query stands for is not one answer. Probe an Allegro transformer with "
                "patch_size_t=1 (every released Allegro model)")
    return None


FAMILY = Family(
    name="allegro",
    title="Allegro (AllegroTransformer3DModel)",
    denoisers=("AllegroTransformer3DModel",),
    kinds=("cross",),
    text_streams=first_text_encoder,
    reader="kernel",
    video=_frames,
    pipe_refused=_temporal_patch,
    one_prompt=True,  # diffusers 0.42's AutoencoderKLAllegro.tiled_decode fails for more than one video per call
)
