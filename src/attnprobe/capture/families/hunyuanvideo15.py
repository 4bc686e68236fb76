"""HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Transformer3DModel`` in ``HunyuanVideo15Pipeline``): double-stream
blocks (``transformer_blocks.i.attn``, text projections of their own), one softmax over ``[video; text block]`` (the
video's patch tokens first: ``[batch, channel, frame, h, w]`` latents in ``(patch_size_t, patch_size, patch_size)``
patches, ``qt × qh × qw`` queries in ``(t, h, w)`` order) with a 3-D RoPE on the video positions only and each row's
masked keys left out; read at the kernel.

The text block: the denoiser reorders each row's keys by its masks to ``[attended image tokens; attended ByT5;
attended Qwen; masked image tokens; masked ByT5; masked Qwen]``. The image tokens are ``image_embeds``
(``vision_num_semantic_tokens`` SigLIP states, 729; all zero, and so all masked, in text-to-video): they share the
softmax and are not on the ``token`` axis. The ``token`` axis holds the ``encoder_hidden_states_2`` (ByT5) and
``encoder_hidden_states`` (Qwen) keys in the order the denoiser puts them, per row: ``[attended ByT5; attended Qwen;
masked ByT5; masked Qwen]`` (``Family.text_order``), the masked ones with probability 0. A map is the video-query ×
text-key block of the softmax: summing to the text share (``joint="exact"``) or renormalised over the text
(``"renorm"``).

Labels: Qwen2.5-VL's hidden states (third from last) of the prompt inside the pipeline's chat template (its
``system_message``, then the prompt as the user's turn, then the assistant header), its first
``prompt_template_encode_start_idx`` positions dropped (108 for the real tokenizer), ``tokenizer_max_length`` (1000)
kept; ByT5's ``tokenizer_2_max_length`` (256) positions of the prompt's quoted text (``Text "…". ``; all masked when it
quotes nothing). ByT5's tokenizer has no offsets: its glyph positions are ``"unknown"``, a concept is found in the Qwen
positions only. Guidance runs as separate calls (the pipeline's guider: the prompt's first).

Refused: a call whose ``image_embeds`` rows are not the latents' (diffusers 0.42 makes them per prompt, not per video:
``num_videos_per_prompt > 1``, where its ``encode_prompt`` also repeats the masks in another row order than the states)
or without the masks by keyword; the image-to-video pipeline (``HunyuanVideo15ImageToVideoPipeline``: the input
image's tokens attended, its latents in extra channels; untested) by name (``capture.passes.REFUSED``).
"""

from __future__ import annotations

import torch

from ...errors import ProbeError
from .hunyuanimage import glyph_positions
from .registry import Family, chat_rendering, first_text_encoder


def _frames(denoiser, sample):
    """Latent frames of ``[batch, channel, frame, h, w]`` and the ``(pt, ph, pw)`` patch."""
    p = int(denoiser.config.patch_size)
    return int(sample.shape[2]), (int(denoiser.config.patch_size_t), p, p)


def _template(pipe, prompt: str, n_keys: int):
    # the pipeline renders [system, user] with the generation prompt, an empty prompt as " ", padded to max + crop
    messages = lambda text: [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": text}]
    rendered = chat_rendering(pipe.tokenizer, messages, prompt or " ", n_keys, add_generation_prompt=True)
    if rendered is None:
        return []
    return [(rendered[0], rendered[1], pipe.tokenizer_max_length + pipe.prompt_template_encode_start_idx)]


def _glyph_text(prompt: str):
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    return extract_glyph_texts(prompt)


def _positions(pipe, layout, n_keys: int):
    return glyph_positions(pipe, layout, n_keys, _glyph_text)


def _text_order(denoiser, kwargs: dict):
    """``(text [batch, n_keys], added [batch, image tokens])``: where each row's ``token``-axis keys (ByT5's, then
    Qwen's, as ``[attended ByT5; attended Qwen; masked ByT5; masked Qwen]``) and its image tokens sit in the text block
    the denoiser builds from its masks (positions after the video's)."""
    qwen, glyph, image = (kwargs.get(n) for n in ("encoder_attention_mask", "encoder_attention_mask_2", "image_embeds"))
    states, states_2, sample = (kwargs.get(n) for n in ("encoder_hidden_states", "encoder_hidden_states_2",
                                                        "hidden_states"))
    tensors = (qwen, glyph, image, states, states_2, sample)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        missing = [n for n, t in zip(("encoder_attention_mask", "encoder_attention_mask_2", "image_embeds",
                                      "encoder_hidden_states", "encoder_hidden_states_2", "hidden_states"), tensors)
                   if not isinstance(t, torch.Tensor)]
        raise ProbeError(f"{type(denoiser).__name__} was called without {missing} by keyword; attnprobe orders each "
                         "row's text keys from those masks as the denoiser does, so it needs them as its pipeline "
                         "passes them")
    batch = int(sample.shape[0])
    if (tuple(qwen.shape) != (batch, states.shape[1]) or tuple(glyph.shape) != (batch, states_2.shape[1])
            or image.shape[0] != batch):
        raise ProbeError(
            f"{type(denoiser).__name__} was called with {batch} latent rows, encoder_attention_mask "
            f"{tuple(qwen.shape)}, encoder_attention_mask_2 {tuple(glyph.shape)} and image_embeds "
            f"{tuple(image.shape)}: not one mask row and one image row per latent row, so which text keys a row "
            "attends to is not known. diffusers 0.42's HunyuanVideo15Pipeline makes image_embeds per prompt (and "
            "repeats the masks in another row order than the states) with num_videos_per_prompt > 1: call it with "
            "num_videos_per_prompt=1 (repeat the prompt instead)"
        )
    n_glyph, n_image = int(glyph.shape[1]), int(image.shape[1])
    attended = (glyph != 0).sum(1, keepdim=True) + (qwen != 0).sum(1, keepdim=True)  # [batch, 1]
    key = torch.arange(n_glyph + int(qwen.shape[1]), device=qwen.device)[None]
    image_first = not bool(torch.all(image == 0))  # the denoiser's own test: text-to-video's image tokens are masked
    image_at = torch.zeros_like(attended) if image_first else attended  # [batch, 1]
    text = key + n_image * (key >= image_at)  # past the image tokens: shifted by them
    return text, image_at + torch.arange(n_image, device=qwen.device)[None]


FAMILY = Family(
    name="hunyuanvideo15",
    title="HunyuanVideo 1.5 text-to-video (HunyuanVideo15Transformer3DModel)",
    denoisers=("HunyuanVideo15Transformer3DModel",),
    kinds=("joint",),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=False,
    template=_template,
    text_positions=_positions,
    text_order=_text_order,
    video=_frames,
    one_prompt=True,
)
