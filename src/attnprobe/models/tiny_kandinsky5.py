"""The tiny Kandinsky 5 text-to-video pipeline: diffusers' ``Kandinsky5T2VPipeline``, ``Kandinsky5Transformer3DModel``
and ``AutoencoderKLHunyuanVideo`` at widths of 8 to 32, seeded, with a 2-layer Qwen2.5-VL over the offline
``llm_tokenizer`` and a 2-layer CLIP for the pooled vector. ``attnprobe.models.tiny.tiny_pipeline("kandinsky5")``
builds it by name.

    >>> pipe = tiny_kandinsky5_pipeline()
    >>> type(pipe).__name__, type(pipe.transformer).__name__, pipe.transformer.config.patch_size
    ('Kandinsky5T2VPipeline', 'Kandinsky5Transformer3DModel', (1, 2, 2))

Call it with a small video: ``num_frames=9`` (3 latent frames: the VAE's temporal compression is 4),
``height=width=32`` (4 × 4 latents; 2 × 2 patches of 2 × 2), 2 steps, ``max_sequence_length=16``.
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from .components import finish, make_clip_encoder, make_hunyuan_video_vae
from .tiny_llm import qwen25vl_encoder
from .tokenizers import clip_tokenizer, llm_tokenizer

__all__ = ["tiny_kandinsky5_pipeline"]


@quiet_notes()
def tiny_kandinsky5_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``Kandinsky5T2VPipeline`` with Kandinsky 5's structure: 1 text block and 2 visual blocks (2 heads of 8
    channels; each visual block's ``cross_attention`` attends from the video's patch tokens to the text keys, without
    a mask), ``(1, 2, 2)`` patches of channel-last ``[batch, frame, h, w, channel]`` latents, regular (not NABLA)
    attention, its modulations seeded (diffusers starts them at 0, which would gate every attention out); a 2-layer
    Qwen2.5-VL of width 16 (``llm_tokenizer``) reading the prompt inside the pipeline's chat template, cut at
    ``prompt_template_encode_start_idx`` set to the tiny tokenizer's count of the template before the prompt less 2
    (the real pipeline's 128 counts the real tokenizer's): the keys start with ``<|im_start|>`` and ``user``; a 2-layer CLIP of width 16 for the pooled vector
    (``clip_tokenizer``), HunyuanVideo's causal video VAE (temporal compression 4, spatial 8, 4 latent channels) and a
    flow-matching Euler scheduler. Guided calls run as separate denoiser calls, the prompt's first. With another
    ``dtype`` the transformer's ``_keep_in_fp32_modules`` stay float32, as ``from_pretrained`` keeps them.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import (FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline,
                           Kandinsky5Transformer3DModel)

    tokenizer = llm_tokenizer()
    torch.manual_seed(seed)
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=16, time_dim=16, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(2, 2, 4),
    ).eval()
    with torch.no_grad():  # diffusers zeroes the modulations: every gate 0, the attention's output unused
        for name, param in transformer.named_parameters():
            if "modulation" in name:
                param.normal_(0.0, 0.3)
    vae = make_hunyuan_video_vae(seed + 1)
    torch.manual_seed(seed + 2)
    pipe = Kandinsky5T2VPipeline(
        transformer=transformer, vae=vae, text_encoder=qwen25vl_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=make_clip_encoder(16, seed + 3), tokenizer_2=clip_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    # the template before the prompt less its last two tokens ("<|im_start|>", "▁user"): 137 of the tiny tokenizer's
    # 139, so the keys start with template positions, as the real pipeline's cut (128) may leave some
    pipe.prompt_template_encode_start_idx = len(tokenizer(pipe.prompt_template.split("{}")[0]).input_ids) - 2
    pipe = finish(pipe, dtype)
    keep = set(transformer._keep_in_fp32_modules)  # as from_pretrained keeps them (the time embedding's input is fp32)
    for name, module in pipe.transformer.named_modules():
        if keep & set(name.split(".")):
            module.float()
    return pipe
