"""CogVideoX (``CogVideoXTransformer3DModel`` in ``CogVideoXPipeline``): each block's ``attn1`` attends over one
``[text; video]`` sequence (T5's positions first, then the video's patch tokens: ``[batch, frame, channel, h, w]``
latents in ``patch_size × patch_size`` patches, and ``patch_size_t`` frames per query in CogVideoX 1.5), after
``norm_q``/``norm_k`` and with a 3-D rotary embedding on the video positions only, read at the kernel. Structure calls
it ``single`` (a self-attention whose block is handed ``encoder_hidden_states``); its map is the video-query ×
text-key block of the one softmax, summing to the text share (``joint="exact"``)."""

from .registry import Family, first_text_encoder


def _frames(denoiser, sample):
    """Latent frames of ``[batch, frame, channel, h, w]`` and the ``(pt, ph, pw)`` patch."""
    p, pt = int(denoiser.config.patch_size), denoiser.config.patch_size_t
    return int(sample.shape[1]), (int(pt) if pt else 1, p, p)


FAMILY = Family(
    name="cogvideox",
    title="CogVideoX, CogVideoX 1.5 (CogVideoXTransformer3DModel)",
    denoisers=("CogVideoXTransformer3DModel",),
    kinds=("single",),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=True,
    video=_frames,
)
