"""Sana-Video (``SanaVideoTransformer3DModel`` in ``SanaVideoPipeline``): Sana's reading over a video. Each block's
``attn2`` cross-attends from the video's patch tokens (``[batch, channel, frame, h, w]`` latents, a ``Conv3d`` of
the ``(pt, ph, pw)`` patch: ``qt × qh × qw`` queries in ``(t, h, w)`` order) to Gemma 2's positions, after RMS norms
across heads and with the padding mask as a −10000 bias, read at the kernel; its ``attn1`` is linear self-attention,
not a site. Its pipeline decodes with Wan 2.1's causal VAE (or LTX-2's, or a DC-AE: their frame
record follows ``frames.video_meta``'s rule of a first frame alone). Text keys: Sana's (``sana``): ``<bos>``, the complex human instruction's last position (``template``),
the prompt's words, then padding (probability 0 in fp32). Guidance batches ``[uncond, cond]``.
"""

from dataclasses import replace

from .sana import FAMILY as SANA


def _frames(denoiser, sample):
    """Latent frames of ``[batch, channel, frame, h, w]`` and the ``(pt, ph, pw)`` patch."""
    return int(sample.shape[2]), tuple(int(p) for p in denoiser.config.patch_size)


FAMILY = replace(SANA, name="sana-video", title="Sana-Video (SanaVideoTransformer3DModel)",
                 denoisers=("SanaVideoTransformer3DModel",), video=_frames)
