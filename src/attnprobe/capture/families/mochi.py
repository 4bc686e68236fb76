"""Mochi 1 text-to-video (``MochiTransformer3DModel`` in ``MochiPipeline``): each block's ``attn1``
(``MochiAttention``, text projections of its own) is joint attention over ``[video; text]``, the video's patch tokens
first (``[batch, channel, frame, h, w]`` latents, each latent frame in ``patch_size × patch_size`` patches: ``qt × qh ×
qw`` queries in ``(t, h, w)`` order) with a 3-D RoPE on the video positions only. Its processor
(``MochiAttnProcessor2_0``) calls the kernel once per batch row, over the video positions and that row's attended text
positions only (``encoder_attention_mask.nonzero()``): read at the kernel, call by call (``Family.row_calls``). A site's
map is the video-query × text-key block of each row's softmax, the text keys back at their positions on the ``token``
axis: summing to the row's text share (``joint="exact"``) or renormalised over the text (``"renorm"``); the positions a
row's mask leaves out (T5's padding) are in none of its softmax and get probability exactly 0.

Text keys: T5's positions of the prompt (``</s>`` and padding to ``max_sequence_length``, 256), no template. Guided
calls batch ``[uncond, cond]``. With ``force_zeros_for_empty_prompt`` an empty prompt's row attends to no text: its
``exact`` maps are 0 and ``renorm`` is refused.
"""

from __future__ import annotations

from .registry import Family, first_text_encoder


def _frames(denoiser, sample):
    """Latent frames of ``[batch, channel, frame, h, w]`` and the ``(1, patch_size, patch_size)`` patch."""
    p = int(denoiser.config.patch_size)
    return int(sample.shape[2]), (1, p, p)


FAMILY = Family(
    name="mochi",
    title="Mochi 1 text-to-video (MochiTransformer3DModel)",
    denoisers=("MochiTransformer3DModel",),
    kinds=("joint",),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=False,
    row_calls=True,
    video=_frames,
)
