"""Tiny video pipelines: the real diffusers pipeline, denoiser and video-VAE classes of Wan 2.1, SkyReels-V2,
CogVideoX and HunyuanVideo at widths of 8 to 32, seeded, with the offline ``t5_tokenizer`` (HunyuanVideo:
``llm_tokenizer`` and ``clip_tokenizer``). ``attnprobe.models.tiny.tiny_pipeline`` builds them by name (``"wan"``,
``"skyreels-v2"``, ``"cogvideox"``, ``"hunyuanvideo"``).

    >>> pipe = tiny_wan_pipeline()
    >>> type(pipe).__name__, type(pipe.transformer).__name__, pipe.transformer.config.patch_size
    ('WanPipeline', 'WanTransformer3DModel', (1, 2, 2))

Call them with small videos: ``num_frames=9`` (3 latent frames after the VAEs' temporal compression of 4),
``height=width=32`` or 48, 2 steps, ``max_sequence_length=16`` (CogVideoX: exactly its ``max_text_seq_length``, 16;
HunyuanVideo: also ``prompt_template=TINY_HUNYUANVIDEO_TEMPLATE``, whose ``crop_start`` is the tiny tokenizer's).
"""

from __future__ import annotations

import functools

import torch

from .._quiet import quiet_notes
from .components import finish, ftfy_stand_in, make_clip_encoder, make_hunyuan_video_vae
from .tokenizers import clip_tokenizer, llm_tokenizer, t5_tokenizer, t5_vocab_size

__all__ = ["tiny_wan_pipeline", "tiny_skyreels_v2_pipeline", "tiny_cogvideox_pipeline", "tiny_hunyuanvideo_pipeline",
           "TINY_HUNYUANVIDEO_TEMPLATE", "tiny_hunyuanvideo_template"]


def _t5(seed: int, umt5: bool):
    """A 2-layer (UM)T5 encoder of width 32 over ``t5_tokenizer``'s vocabulary, seeded."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config = (UMT5Config if umt5 else T5Config)(
        vocab_size=t5_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return (UMT5EncoderModel if umt5 else T5EncoderModel)(config).eval()


@quiet_notes()
def tiny_wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``WanPipeline`` with Wan 2.1's structure: 2 ``WanTransformerBlock`` (2 heads of 8 channels; ``attn1`` video
    self-attention with 3-D RoPE, ``attn2`` cross-attention to the text with RMS norms across heads), ``(1, 2, 2)``
    patches, a 2-layer UMT5 encoder of width 32 (``t5_tokenizer``), Wan's causal video VAE (temporal compression 4,
    spatial 8, 16 latent channels) and a flow-matching Euler scheduler. Guided calls run the passes as separate
    denoiser calls.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    parts = _wan_parts(WanTransformer3DModel, seed)
    return finish(WanPipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)), dtype)


def _wan_parts(denoiser_class, seed: int) -> dict:
    """Wan 2.1's tiny transformer (of ``denoiser_class``: Wan's or SkyReels-V2's, which take the same config), video
    VAE, UMT5 encoder and tokenizer, seeded."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    transformer = denoiser_class(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return dict(tokenizer=t5_tokenizer(), text_encoder=_t5(seed + 2, umt5=True), vae=vae, transformer=transformer)


@quiet_notes()
def tiny_skyreels_v2_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``SkyReelsV2Pipeline`` (text-to-video) with the tiny Wan 2.1 structure of ``tiny_wan_pipeline`` in
    ``SkyReelsV2Transformer3DModel`` and its flow-matching UniPC scheduler. Guided calls run the passes as separate
    denoiser calls. Where ftfy is not installed, the pipeline's module gets a stand-in for it (``ftfy_stand_in``).

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler
    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2

    ftfy_stand_in(pipeline_skyreels_v2)  # it cleans every prompt with ftfy, installed or not
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    return finish(SkyReelsV2Pipeline(**_wan_parts(SkyReelsV2Transformer3DModel, seed), scheduler=scheduler), dtype)


@quiet_notes()
def tiny_cogvideox_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``CogVideoXPipeline`` with CogVideoX-5b's structure: 2 ``CogVideoXBlock`` (2 heads of 16 channels, the
    fewest its 3-D rotary table splits evenly; ``attn1`` over ``[text; video]``, the text first, with q/k layer norms
    and a 3-D rotary embedding on the video positions),
    2×2 patches, a 2-layer T5 encoder of width 32 (``t5_tokenizer``; ``max_text_seq_length`` 16, so pass
    ``max_sequence_length=16``), CogVideoX's causal video VAE (temporal compression 4, spatial 8) and its DDIM
    scheduler. Guided calls batch ``[uncond, cond]``.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=2, sample_width=6, sample_height=6, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    pipe = CogVideoXPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5(seed + 2, umt5=False), vae=vae,
                             transformer=transformer, scheduler=CogVideoXDDIMScheduler())
    return finish(pipe, dtype)


@functools.cache
def tiny_hunyuanvideo_template() -> dict:
    """``prompt_template`` for ``tiny_hunyuanvideo_pipeline``'s calls: HunyuanVideo's default prompt template with the
    ``crop_start`` of ``llm_tokenizer`` (the template's tokens before the prompt: 166), so the text keys start at the
    prompt as the real ones do; the pipeline's own ``crop_start`` (95) counts the real Llama tokenizer's tokens. Made
    at first use (also as ``TINY_HUNYUANVIDEO_TEMPLATE``): reading diffusers' template imports its HunyuanVideo
    pipeline module, which took about a second of every ``import attnprobe``. Do not change the dict it returns."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    return {"template": template, "crop_start": len(llm_tokenizer()(template.split("{}")[0]).input_ids)}


def __getattr__(name: str):
    """``TINY_HUNYUANVIDEO_TEMPLATE``: ``tiny_hunyuanvideo_template()``, made at first use."""
    if name == "TINY_HUNYUANVIDEO_TEMPLATE":
        return tiny_hunyuanvideo_template()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"TINY_HUNYUANVIDEO_TEMPLATE"})


@quiet_notes()
def tiny_hunyuanvideo_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``HunyuanVideoPipeline`` with HunyuanVideo's structure: a 1-layer token refiner, 1 double-stream block
    (``transformer_blocks.0.attn``: ``[video; text]`` with text projections of its own) and 2 single-stream blocks
    (``single_transformer_blocks.i.attn``), 2 heads of 8 channels, ``(1, 2, 2)`` patches, a 3-D RoPE on the video
    positions only, the text padding masked out; a 3-layer Llama encoder of width 16 (``llm_tokenizer``; the keys are
    its third-from-last hidden states, as the real one's) reading the prompt inside diffusers' template, a 2-layer CLIP
    encoder of width 32 for the pooled vector (``clip_tokenizer``), HunyuanVideo's causal video VAE (temporal
    compression 4, spatial 8, 4 latent channels) and a flow-matching Euler scheduler. Guidance is embedded
    (``guidance_embeds``): one conditional call per step; ``true_cfg_scale > 1`` with a negative prompt adds a separate
    unconditional call. Pass ``prompt_template=TINY_HUNYUANVIDEO_TEMPLATE`` (the default's ``crop_start`` counts the
    real Llama tokenizer's tokens).

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import (FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import LlamaConfig, LlamaModel

    tokenizer = llm_tokenizer()
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=32,
        rope_axes_dim=(2, 2, 4),
    ).eval()
    vae = make_hunyuan_video_vae(seed + 1)
    torch.manual_seed(seed + 2)
    llama = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
    )).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=make_clip_encoder(32, seed + 3),
        tokenizer_2=clip_tokenizer(),
    )
    return finish(pipe, dtype)
