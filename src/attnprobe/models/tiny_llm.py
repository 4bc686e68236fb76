"""Tiny pipelines of the families whose text encoder is an LLM (Qwen-Image: Qwen2.5-VL; Sana: Gemma 2): the real
diffusers pipeline and denoiser classes and the real ``transformers`` encoder classes at widths of 8 to 32, seeded,
with the offline ``llm_tokenizer``. ``attnprobe.models.tiny.tiny_pipeline`` builds them by name.

    >>> pipe = tiny_qwen_pipeline()
    >>> type(pipe).__name__, type(pipe.text_encoder).__name__
    ('QwenImagePipeline', 'Qwen2_5_VLForConditionalGeneration')
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from .components import (finish, make_byt5_encoder, make_clip_encoder, make_flow_vae, make_scheduler, make_t5_encoder,
                         make_vae)
from .configs import SDXL_UNET
from .tokenizers import clip_tokenizer, llm_tokenizer, t5_tokenizer

__all__ = ["tiny_qwen_pipeline", "tiny_sana_pipeline", "tiny_flux2_pipeline", "tiny_flux2_dev_pipeline", "tiny_cogview4_pipeline", "tiny_kolors_pipeline",
           "tiny_lumina2_pipeline", "tiny_zimage_pipeline", "tiny_hidream_pipeline",
           "tiny_hunyuanimage_pipeline", "tiny_lumina_next_pipeline",
           "tiny_ovis_pipeline"]


#: ``tokenizers.CHAT_TEMPLATE`` for messages whose content is a string or a list of ``{"type": "text", "text": …}``
#: parts (Flux.2 [dev]'s pipeline hands its processor such lists)
CONTENT_LIST_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _gemma2(tokenizer, layers: int):
    """A Gemma 2 encoder of width 16 (2 heads of 8, 1 key-value head) over ``tokenizer``'s vocabulary, seeded by the
    caller (Sana's and Lumina 2's text encoder)."""
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(
        head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=layers,
        num_key_value_heads=1, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation="eager",
    )).eval()


def _qwen3_config(tokenizer, layers: int):
    """A Qwen 3 config of width 16 (2 heads of 8, 1 key-value head) over ``tokenizer``'s vocabulary (Flux.2 [klein]'s
    and Z-Image's text encoder)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        intermediate_size=32, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )


@quiet_notes()
def tiny_qwen_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``QwenImagePipeline`` with Qwen-Image's structure: 2 double-stream blocks (2 heads of 8 channels, RoPE over
    axes (2, 2, 4), latents packed 2×2), a 2-layer Qwen2.5-VL encoder of width 16 reading the prompt inside the
    pipeline's own chat template (``llm_tokenizer``; ``prompt_template_encode_start_idx`` set to where that tokenizer's
    template ends, 34 for the real one), Qwen-Image's 3-level causal VAE (8× down-sampling) and a flow-matching Euler
    scheduler. Classifier-free guidance (``true_cfg_scale`` > 1 with a negative prompt) runs as separate calls.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    tokenizer = llm_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    torch.manual_seed(seed + 2)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=qwen25vl_encoder(tokenizer), tokenizer=tokenizer, transformer=transformer)
    head = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(head).input_ids)
    return finish(pipe, dtype)


def qwen25vl_encoder(tokenizer):
    """A 2-layer Qwen2.5-VL encoder of width 16 (and a 1-layer vision tower) over ``tokenizer``'s vocabulary, seeded
    by the caller (Qwen-Image's and HunyuanImage's text encoder)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("vision_token_id", "<|image_pad|>"), ("image_token_id", "<|image_pad|>"))}
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), rope_theta=1e6,
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@quiet_notes()
def tiny_sana_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``SanaPipeline`` with Sana's structure: 2 linear-attention DiT blocks (2 heads of 8 channels) whose ``attn2``
    cross-attends to a 1-layer Gemma 2 encoder of width 16 (``llm_tokenizer(bos=True)``, reading the prompt after
    Sana's complex human instruction), a 2-level DC-AE (``AutoencoderDC``, 2× down-sampling, 4 latent channels)
    and a flow-matching Euler scheduler. ``sample_size`` 32.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer = llm_tokenizer(bos=True)
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=32,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    ).eval()
    torch.manual_seed(seed + 2)
    encoder = _gemma2(tokenizer, layers=1)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return finish(pipe, dtype)


def _flux2_parts(seed: int, guidance_embeds: bool):
    """Flux.2's transformer (1 double-stream and 2 parallel single-stream blocks, 2 heads of 8 channels, RoPE over 4
    axes, text width 48 = 3 stacked layers of 16) and a 1-level Flux.2 VAE, seeded ``seed`` and ``seed + 1``."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance_embeds,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    return transformer, vae


@quiet_notes()
def tiny_flux2_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``Flux2KleinPipeline`` with Flux.2's structure (``_flux2_parts``), a 27-layer Qwen 3 encoder of width 16
    reading the prompt in its chat template (``llm_tokenizer``; the hidden states of its layers 9, 18 and 27, the
    pipeline's default ``text_encoder_out_layers``, stacked along features), latents patched 2×2 (a 64×96 px image is
    a 32×48 grid) and a flow-matching Euler scheduler. Not distilled: guidance above 1 runs the unconditional pass as
    separate calls.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    tokenizer = llm_tokenizer()
    transformer, vae = _flux2_parts(seed, guidance_embeds=False)
    torch.manual_seed(seed + 2)
    encoder = Qwen3ForCausalLM(_qwen3_config(tokenizer, 27)).eval()
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=encoder,
                              tokenizer=tokenizer, transformer=transformer)
    return finish(pipe, dtype)


@quiet_notes()
def tiny_flux2_dev_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``Flux2Pipeline`` (Flux.2 [dev]) with its structure (``_flux2_parts``, guidance as an embedding: one pass per
    call), a 30-layer Mistral 3 of width 16 (a 1-layer Pixtral vision tower) whose hidden states of layers 10, 20 and
    30 are stacked along features, reading the pipeline's system message and the prompt in a chat template. The
    tokenizer (``llm_tokenizer`` with a template that takes content lists) stands in for Mistral's processor, whose
    ``apply_chat_template`` the pipeline calls the same way (the processor itself needs torchvision).

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = llm_tokenizer()
    tokenizer.chat_template = CONTENT_LIST_TEMPLATE
    transformer, vae = _flux2_parts(seed, guidance_embeds=True)
    torch.manual_seed(seed + 2)
    encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=len(tokenizer),
                         max_position_embeddings=1024),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=32, patch_size=16),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image_pad|>"), spatial_merge_size=2,
    )).eval()
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=encoder,
                         tokenizer=tokenizer, transformer=transformer)
    return finish(pipe, dtype)


@quiet_notes()
def tiny_cogview4_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``CogView4Pipeline`` with CogView4's structure: 2 blocks attending over ``[text; image]`` (2 heads of 8
    channels, patch size 2, rotary embedding on the image positions), a 2-layer GLM encoder of width 16 whose
    tokenizer pads on the left (``llm_tokenizer(padding_side="left")``; the pipeline pads the prompt to a multiple of
    16 positions), a 4-level VAE (8× down-sampling, 4 latent channels) and CogView4's flow-matching scheduler
    (dynamic shifting). Classifier-free guidance runs as separate calls.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmForCausalLM

    tokenizer = llm_tokenizer(bos=True, padding_side="left")  # GLM-4 starts every encoding with [gMASK]<sop>
    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, rope_axes_dim=(4, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    torch.manual_seed(seed + 2)
    encoder = GlmForCausalLM(GlmConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.pad_token_id,
    )).eval()
    pipe = CogView4Pipeline(tokenizer=tokenizer, text_encoder=encoder, vae=make_flow_vae(seed + 1),
                            transformer=transformer, scheduler=scheduler)
    return finish(pipe, dtype)


@quiet_notes()
def tiny_kolors_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``KolorsPipeline`` with Kolors' structure: ``tiny_sdxl_pipeline``'s UNet layout with a text projection
    (``encoder_hid_dim_type="text_proj"``) from a 2-layer ChatGLM encoder of width 16 (diffusers' own ``ChatGLMModel``;
    ``llm_tokenizer`` pads on the left, starts with ``<bos>`` as ChatGLM's ``[gMASK]sop`` and returns
    ``position_ids``; the keys are its second-to-last hidden states, ``max_sequence_length`` 256 positions), a 4-level
    VAE and an Euler scheduler.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import KolorsPipeline, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    tokenizer = llm_tokenizer(bos=True, padding_side="left", position_ids=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **dict(SDXL_UNET, block_out_channels=(16, 32, 32), transformer_layers_per_block=(1, 1, 2),
               attention_head_dim=(2, 2, 4), cross_attention_dim=32, addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=6 * 8 + 16, sample_size=8, encoder_hid_dim_type="text_proj",
               encoder_hid_dim=16),
        norm_num_groups=8,
    ).eval()
    torch.manual_seed(seed + 2)
    encoder = ChatGLMModel(ChatGLMConfig(
        num_layers=2, padded_vocab_size=len(tokenizer), hidden_size=16, ffn_hidden_size=32, kv_channels=8,
        num_attention_heads=2, seq_length=512, multi_query_attention=True, multi_query_group_num=1, original_rope=True,
    ), empty_init=False).eval()  # empty_init (its default) leaves the weights' memory uninitialised
    with torch.no_grad():  # so does its RMSNorm for its weight in any case: uninitialised memory, sometimes NaN
        for module in encoder.modules():
            if type(module).__name__ == "RMSNorm":
                module.weight.fill_(1.0)
    pipe = KolorsPipeline(vae=make_vae(seed + 1), text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=make_scheduler("euler"), force_zeros_for_empty_prompt=False)
    return finish(pipe, dtype)


@quiet_notes()
def tiny_lumina2_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``Lumina2Pipeline`` with Lumina-Image 2.0's structure: a context and a noise refiner, then 2 layers over each
    row's ``[caption; image]`` (2 heads of 8 channels, 1 key-value head, patch size 2), a 2-layer Gemma 2 encoder of
    width 16 (``llm_tokenizer(bos=True)``) reading the prompt after the pipeline's system prompt, a 4-level VAE and a
    flow-matching Euler scheduler. Classifier-free guidance runs as separate calls.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    tokenizer = llm_tokenizer(bos=True)
    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(4, 2, 2), cap_feat_dim=16,
    ).eval()
    torch.manual_seed(seed + 2)
    encoder = _gemma2(tokenizer, layers=2)
    pipe = Lumina2Pipeline(transformer=transformer, vae=make_flow_vae(seed + 1), text_encoder=encoder,
                           tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler())
    return finish(pipe, dtype)


@quiet_notes()
def tiny_zimage_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``ZImagePipeline`` with Z-Image's structure: a noise refiner (image only) and a context refiner (text only),
    then 2 layers over each row's ``[image; caption]``, both padded to a multiple of 32 positions with learned pad
    tokens (2 heads of 8 channels, patch size 2), a 2-layer Qwen 3 encoder of width 16 reading the prompt in its chat
    template (``llm_tokenizer``; its second-to-last hidden states, padding dropped), a 4-level VAE (a 64 × 96 px
    image is a 4 × 6 grid of patches) and a flow-matching Euler scheduler.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    tokenizer = llm_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        in_channels=4, dim=16, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
        axes_dims=[2, 2, 4], axes_lens=[256, 64, 64],
    ).eval()
    torch.manual_seed(seed + 2)
    encoder = Qwen3Model(_qwen3_config(tokenizer, 2)).eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=make_flow_vae(seed + 1),
                          text_encoder=encoder, tokenizer=tokenizer, transformer=transformer)
    return finish(pipe, dtype)


@quiet_notes()
def tiny_hidream_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``HiDreamImagePipeline`` with HiDream-I1's structure: 1 double-stream and 2 single-stream blocks (2 heads of 8
    channels, patch size 2, 3-axis RoPE, mixture-of-experts feed-forwards) whose text is ``[T5; Llama's last listed
    layer; Llama's layer for the block]``; two Long-CLIP encoders (248 positions) with projection of width 16 (pooled only), a T5 encoder
    of width 32 (``t5_tokenizer``) and a 2-layer Llama of width 16 (``llm_tokenizer`` with ``<bos>``), each read to
    ``max_sequence_length`` positions; a 4-level VAE, a flow-matching Euler scheduler. ``max_resolution`` is 16 × 16
    patches, so a non-square latent is padded to 64 image positions (as the real model pads to 4096). The pipeline
    scales every requested size to the area of ``default_sample_size · 8`` px squared (1024² for the real model; 64²
    here), keeping its aspect: 64 × 96 px gives 48 × 64.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = llm_tokenizer(bos=True)
    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=[32, 16], text_emb_dim=32, num_routed_experts=4, num_activated_experts=2,
        axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=[0, 1, 1],
    ).eval()
    torch.manual_seed(seed + 3)
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation="eager",
    )).eval()
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=make_flow_vae(seed + 1),
        text_encoder=make_clip_encoder(16, seed + 4, projection=True, positions=248), tokenizer=clip_tokenizer(),
        text_encoder_2=make_clip_encoder(16, seed + 5, projection=True, positions=248), tokenizer_2=clip_tokenizer(),
        text_encoder_3=make_t5_encoder(seed + 2), tokenizer_3=t5_tokenizer(), text_encoder_4=llama,
        tokenizer_4=tokenizer, transformer=transformer,
    )
    pipe.default_sample_size = 8
    return finish(pipe, dtype)


@quiet_notes()
def tiny_hunyuanimage_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``HunyuanImagePipeline`` with HunyuanImage 2.1's structure: a 1-layer token refiner, 1 double-stream and 2
    single-stream blocks (2 heads of 8 channels, patch size 1, RoPE on the image positions), ``qwen25vl_encoder`` reading
    the prompt inside the pipeline's chat template (32 positions kept after the template's head, as the real one keeps
    1000), a 1-layer ByT5 encoder of width 32 (``ByT5Tokenizer``, 16 positions of the prompt's quoted text, as the
    real one's 128), a 4-level HunyuanImage VAE (8×, the real one 32×), a flow-matching Euler scheduler and the
    default guider (classifier-free guidance as separate calls).

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import (AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline,
                           HunyuanImageTransformer2DModel)
    from diffusers.guiders import AdaptiveProjectedMixGuidance
    from transformers import ByT5Tokenizer

    tokenizer, glyphs = llm_tokenizer(), ByT5Tokenizer()
    torch.manual_seed(seed)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=2,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, text_embed_2_dim=32, rope_axes_dim=(4, 4),
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanImage(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        spatial_compression_ratio=8, sample_size=64, scaling_factor=1.0,
    ).eval()
    torch.manual_seed(seed + 2)
    encoder = qwen25vl_encoder(tokenizer)
    byt5 = make_byt5_encoder(seed + 3, len(glyphs))
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=encoder, tokenizer=tokenizer,
        text_encoder_2=byt5, tokenizer_2=glyphs, transformer=transformer, guider=AdaptiveProjectedMixGuidance(),
    )
    head = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(head).input_ids)
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = 32, 16
    return finish(pipe, dtype)


@quiet_notes()
def tiny_lumina_next_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``LuminaPipeline`` (Lumina-Next) with its structure: 2 blocks (2 query heads and 1 key-value head of 8
    channels, patch size 2) whose ``attn2`` cross-attends to a 2-layer Gemma 2 encoder of width 16
    (``llm_tokenizer(bos=True)``; its second-to-last hidden states, padding masked), a 4-level VAE and a flow-matching
    Euler scheduler. Pass ``clean_caption=False`` (cleaning needs ``bs4`` and ``ftfy``).

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline

    tokenizer = llm_tokenizer(bos=True)
    torch.manual_seed(seed)
    transformer = LuminaNextDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_attention_heads=2,
        num_kv_heads=1, multiple_of=16, cross_attention_dim=16, scaling_factor=1.0,
    ).eval()
    with torch.no_grad():  # diffusers starts the cross-attention gates at 0: the text would not reach the image
        for layer in transformer.layers:
            layer.gate.normal_()
    torch.manual_seed(seed + 2)
    pipe = LuminaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                          vae=make_flow_vae(seed + 1), text_encoder=_gemma2(tokenizer, 2), tokenizer=tokenizer)
    return finish(pipe, dtype)


@quiet_notes()
def tiny_ovis_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An ``OvisImagePipeline`` with Ovis-Image's structure (Flux's: 1 double- and 2 single-stream blocks, 2 heads of 8
    channels, RoPE over axes (2, 2, 4), latents packed 2×2), a 2-layer Qwen 3 encoder of width 16 reading the
    pipeline's system prompt and the prompt in its chat template (``llm_tokenizer``; ``user_prompt_begin_id`` set to
    where that tokenizer's rendering of the system prompt ends, 28 for the real one), a 4-level VAE and a
    flow-matching Euler scheduler.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
    from transformers import Qwen3Model

    tokenizer = llm_tokenizer()
    torch.manual_seed(seed)
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()
    torch.manual_seed(seed + 2)
    pipe = OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=make_flow_vae(seed + 1),
                             text_encoder=Qwen3Model(_qwen3_config(tokenizer, 2)).eval(), tokenizer=tokenizer,
                             transformer=transformer)
    head = tokenizer.apply_chat_template([{"role": "user", "content": pipe.system_prompt + "\x00"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False).split("\x00")[0]
    pipe.user_prompt_begin_id = len(tokenizer(head, add_special_tokens=False).input_ids)
    return finish(pipe, dtype)
