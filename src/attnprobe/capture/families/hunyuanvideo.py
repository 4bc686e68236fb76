"""HunyuanVideo text-to-video (``HunyuanVideoTransformer3DModel`` in ``HunyuanVideoPipeline``): double-stream blocks
(``transformer_blocks.i.attn``, text projections of their own) then single-stream blocks
(``single_transformer_blocks.i.attn``), one softmax over ``[video; text]`` (the video's patch tokens first:
``[batch, channel, frame, h, w]`` latents in ``(patch_size_t, patch_size, patch_size)`` patches, ``qt × qh × qw``
queries in ``(t, h, w)`` order) with a 3-D RoPE on the video positions only and the text padding masked out (each
row's mask over its own prompt's positions); read at the kernel. A site's map is the video-query × text-key block of
that softmax, summing to the text share (``joint="exact"``), or renormalised over the text (``"renorm"``).

Text keys: the third-from-last hidden states of a Llama encoder that read the prompt inside diffusers'
``DEFAULT_PROMPT_TEMPLATE`` (a system turn describing what to detail, then the prompt as the user's turn). The pipeline
cuts the template's head by ``prompt_template["crop_start"]`` tokens (95 for the real tokenizer) and pads to
``max_sequence_length`` (256): the keys are the last ``max_sequence_length`` positions of the encoding, the prompt's
words, the template's closing ``<|eot_id|>`` and the padding (probability 0). The CLIP encoder (``text_encoder_2``)
gives only the pooled vector. Guidance is embedded (``guidance_scale``, a conditioning input: no unconditional rows);
with ``true_cfg_scale > 1`` and a negative prompt the unconditional pass runs as a separate denoiser call after the
prompt's, as Flux's true CFG does.

Refused here: the image-to-video denoiser (``image_condition_type``: LLaVA keys that start with the input image's
tokens) and the Framepack denoiser are ``refused.HUNYUANVIDEO_IMAGE`` and a refused video family.
"""

from __future__ import annotations

from .registry import Family, first_text_encoder


def _frames(denoiser, sample):
    """Latent frames of ``[batch, channel, frame, h, w]`` and the ``(pt, ph, pw)`` patch."""
    p = int(denoiser.config.patch_size)
    return int(sample.shape[2]), (int(denoiser.config.patch_size_t), p, p)


def _template(pipe, prompt: str, n_keys: int):
    """diffusers' default template with the prompt in it (where its ``{}`` is): the one candidate."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    return [(template.format(prompt), len(template.split("{}")[0]), None)]


def _image_pipeline(pipe):
    if any(c.__name__ == "HunyuanVideoImageToVideoPipeline" for c in type(pipe).__mro__):
        return ("its LLaVA encoder's keys start with the input image's tokens (image_embed_interleave of them), and "
                "the prompt's are cut around the assistant header per row: no labelling of those keys exists. Probe "
                "HunyuanVideoPipeline (text-to-video)")
    return None


FAMILY = Family(
    name="hunyuanvideo",
    title="HunyuanVideo text-to-video (HunyuanVideoTransformer3DModel)",
    denoisers=("HunyuanVideoTransformer3DModel",),
    kinds=("joint", "single"),
    text_streams=first_text_encoder,
    single_needs_joint=True,
    reader="kernel",
    text_first=False,
    template=_template,
    keys_from_end=True,
    video=_frames,
    pipe_refused=_image_pipeline,
)
