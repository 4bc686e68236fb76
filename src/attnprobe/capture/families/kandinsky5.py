"""Kandinsky 5 text-to-video (``Kandinsky5Transformer3DModel`` in ``Kandinsky5T2VPipeline``): text blocks
(``text_transformer_blocks.i``: self-attention over the text alone) refine the Qwen2.5-VL keys, then each visual block
runs the video's self-attention (``visual_transformer_blocks.i.self_attention``) and a cross-attention
(``visual_transformer_blocks.i.cross_attention``) from the video's patch tokens to the refined text keys, without a
mask or a rotary embedding: the sites, read at the kernel (rows sum to 1 over ``token``). The latents are channel-last,
``[batch, frame, h, w, channel]``, patched in ``(t, h, w)`` order by ``patch_size`` (``(1, 2, 2)``): ``qt × qh × qw``
queries.

Text keys: the last hidden states of Qwen2.5-VL reading the prompt inside the pipeline's chat template
(``pipe.prompt_template``: a system turn on how to describe a video, then the prompt as the user's turn), from which the
pipeline cuts the first ``prompt_template_encode_start_idx`` positions (128 for the real tokenizer) of the batch's
encoding (padded to its longest prompt): the keys are the last ``len(ids) − start`` positions, labelled from the ids the
encoder read: what is left of the template's head and ``<|im_start|>user`` (``template``), the prompt's words
(``word``), the closing ``<|im_end|>`` (``template``) and the padding of shorter prompts (``pad``), which the
transformer attends to like any key (it gets no mask). The CLIP encoder (``text_encoder_2``) gives only the pooled
vector. Guidance runs as separate denoiser calls, the prompt's first.

Refused: ``Kandinsky5I2IPipeline`` (image tokens among the text keys), ``Kandinsky5I2VPipeline`` and
``Kandinsky5T2IPipeline`` (not checked yet), the sparse configuration (``attention_type="nabla"``: the video tokens are reordered in 8 × 8 blocks and the
self-attention runs in sparse NABLA blocks, ``refused.KANDINSKY5_NABLA``), a call with ``sparse_params``, and any
attention backend whose kernel is not ``scaled_dot_product_attention`` (the kernel reader says so).
"""

from __future__ import annotations

import torch

from ...errors import ProbeError
from .registry import Family, first_text_encoder


def _frames(denoiser, sample):
    """Latent frames of channel-last ``[batch, frame, h, w, channel]`` latents and the ``(pt, ph, pw)`` patch."""
    return int(sample.shape[1]), tuple(int(p) for p in denoiser.config.patch_size)


def _template(pipe, prompt: str, n_keys: int):
    """The pipeline's chat template with the prompt in it (where its ``{}`` is): the one candidate."""
    template = pipe.prompt_template
    return [(template.format(prompt), len(template.split("{}")[0]), None)]


def _dense_only(denoiser, kwargs: dict) -> int:
    """No keys after the text; a call with ``sparse_params`` (NABLA: video tokens reordered in 8 × 8 blocks) is
    refused: its queries are not in ``(t, h, w)`` order; so is a call whose text rows are not one per video row
    (``num_videos_per_prompt > 1``: diffusers 0.42's pipeline hands one text row for the prompt's videos)."""
    text, video = kwargs.get("encoder_hidden_states"), kwargs.get("hidden_states")
    if isinstance(text, torch.Tensor) and isinstance(video, torch.Tensor) and text.shape[0] != video.shape[0]:
        raise ProbeError(
            f"{type(denoiser).__name__} was called with {text.shape[0]} text row(s) for {video.shape[0]} video rows "
            "(Kandinsky5T2VPipeline with num_videos_per_prompt > 1 does not repeat the text per video): which text "
            "each video row read cannot be labelled. Pass num_videos_per_prompt=1 and repeat the prompt instead"
        )
    if kwargs.get("sparse_params") is not None:
        raise ProbeError(
            f"{type(denoiser).__name__} was called with sparse_params (NABLA sparse attention): its video tokens are "
            "reordered in 8 × 8 blocks (to_fractal), so its queries are not one (t, h, w) grid attnprobe can read. "
            "Probe a Kandinsky 5 model with attention_type='regular'"
        )
    return 0


_UNCHECKED = ("attnprobe has checked Kandinsky 5's reading only in Kandinsky5T2VPipeline (text-to-video); this pipeline "
              "({}) has no tiny builder or reference test yet. Probe Kandinsky5T2VPipeline")

#: Kandinsky 5's other pipelines, refused by name before they run (``Family.pipe_refused``), with why
REFUSED_PIPELINES = {
    "Kandinsky5I2IPipeline": "its Qwen2.5-VL encoder reads the input image with the prompt, so its text keys hold image "
                             "tokens that attnprobe does not label. Probe Kandinsky5T2VPipeline (text-to-video)",
    "Kandinsky5I2VPipeline": _UNCHECKED.format("the input image's latents in extra channels of the first frame"),
    "Kandinsky5T2IPipeline": _UNCHECKED.format("one-frame latents, another template cut"),
}


def _other_pipelines(pipe):
    return next((REFUSED_PIPELINES[c.__name__] for c in type(pipe).__mro__ if c.__name__ in REFUSED_PIPELINES), None)


def _site_kind(denoiser, name: str, kind):
    """Each visual block's ``cross_attention`` is a site (structure cannot tell: ``Kandinsky5Attention`` has no
    ``is_cross_attention``, and its block's forward takes the text positionally); the self-attentions are not."""
    parts = name.split(".")
    return ("cross" if len(parts) == 3 and parts[0] == "visual_transformer_blocks" and parts[2] == "cross_attention"
            else None)


FAMILY = Family(
    name="kandinsky5",
    title="Kandinsky 5 text-to-video (Kandinsky5Transformer3DModel)",
    denoisers=("Kandinsky5Transformer3DModel",),
    kinds=("cross",),
    text_streams=first_text_encoder,
    reader="kernel",
    template=_template,
    keys_from_end=True,
    keys_after=_dense_only,
    site_kind=_site_kind,
    video=_frames,
    channels_last=True,
    pipe_refused=_other_pipelines,
)
