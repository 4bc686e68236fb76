"""Tiny pipelines built offline from configs with seeded weights: the real diffusers pipeline and denoiser classes
with each family's structure at a width of 8 to 32, so that one generation takes milliseconds on a CPU. Their
weights are random: maps and images show the plumbing, not meaning. ``attnprobe.testing`` re-exports them.

    >>> pipe = tiny_sd_pipeline(seed=0)
    >>> type(pipe).__name__, pipe.unet.config.cross_attention_dim
    ('StableDiffusionPipeline', 32)

The tiny UNets keep the real block layout (SD 1.5: 16 cross-attention sites with the same names, 4 resolutions;
SDXL: ``DownBlock2D`` first, two text encoders) with narrow channels; the tiny transformers keep SD3's joint blocks
and three text encoders, Flux's double- and single-stream blocks with RoPE and packed latents, PixArt-α's T5
cross-attention with its padding mask. ``full_size_pipeline`` builds SD 1.5 or SDXL at full size (random weights,
for benchmarks); ``shapes_pipeline`` loads the trained shapes model (``attnprobe.models.shapes``).
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from ..errors import ArgumentError
from .components import finish, make_clip_encoder, make_flow_vae, make_scheduler, make_t5_encoder, make_vae
from .configs import SD15_UNET, SDXL_UNET
from .shapes.model import load as load_shapes
from .tiny_ltx import tiny_ltx_pipeline
from .tiny_llm import (tiny_cogview4_pipeline, tiny_flux2_dev_pipeline, tiny_flux2_pipeline, tiny_hidream_pipeline,
                       tiny_hunyuanimage_pipeline, tiny_kolors_pipeline, tiny_lumina2_pipeline, tiny_lumina_next_pipeline,
                       tiny_ovis_pipeline, tiny_qwen_pipeline, tiny_sana_pipeline, tiny_zimage_pipeline)
from .tiny_allegro import tiny_allegro_pipeline
from .tiny_hunyuanvideo15 import tiny_hunyuanvideo15_pipeline
from .tiny_kandinsky5 import tiny_kandinsky5_pipeline
from .tiny_mochi import tiny_mochi_pipeline
from .tiny_sana_video import tiny_sana_video_pipeline
from .tiny_dits import tiny_prx_pipeline
from .tiny_unets import tiny_cascade_prior_pipeline, tiny_kandinsky3_pipeline
from .tiny_video import tiny_cogvideox_pipeline, tiny_hunyuanvideo_pipeline, tiny_skyreels_v2_pipeline, tiny_wan_pipeline
from .tiny_wan22 import tiny_wan22_pipeline
from .tiny_animatediff import tiny_animatediff_pipeline
from .tiny_vlm import tiny_longcat_pipeline
from .tokenizers import clip_tokenizer, t5_tokenizer, t5_vocab_size

__all__ = ["tiny_sd_pipeline", "tiny_sdxl_pipeline", "tiny_sd3_pipeline", "tiny_flux_pipeline", "tiny_pixart_pipeline",
           "tiny_chroma_pipeline", "tiny_if_pipeline", "tiny_hunyuandit_pipeline", "tiny_auraflow_pipeline",
           "tiny_cogview3_pipeline", "tiny_bria_pipeline",
           "tiny_pipeline", "TINY_PIPELINES", "full_size_pipeline", "shapes_pipeline", "tiny_clip"]


@quiet_notes()
def tiny_sd_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler: str = "ddim"):
    """A ``StableDiffusionPipeline`` with SD 1.5's UNet layout (16 ``attn2`` sites, 2 heads each, grids
    8/4/2/1 at 64×64 px), a 2-layer CLIP text encoder of width 32, the real CLIP tokenizer, a 4-level VAE
    (scale factor 8) and seeded random weights. No network, no files.

    Args:
        seed: weight seed. dtype: parameter dtype. scheduler: ``"ddim"``, ``"euler"``, ``"heun"`` or ``"pndm"``.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **dict(SD15_UNET, block_out_channels=(16, 16, 32, 32), cross_attention_dim=32, attention_head_dim=2, sample_size=8),
        norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=make_vae(seed + 1),
        text_encoder=make_clip_encoder(32, seed + 2),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=make_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


@quiet_notes()
def tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, scheduler: str = "euler"):
    """A ``StableDiffusionXLPipeline`` with SDXL's UNet layout (``DownBlock2D`` first, then two cross-attention
    levels; 1 and 2 transformer layers), two CLIP text encoders of width 16 (features concatenated: 32), the
    real CLIP tokenizers (the second pads with ``!`` as SDXL's does), a 4-level VAE and seeded weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **dict(
            SDXL_UNET,
            block_out_channels=(16, 32, 32),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 2, 4),
            cross_attention_dim=32,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16,
            sample_size=8,
        ),
        norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=make_vae(seed + 1),
        text_encoder=make_clip_encoder(16, seed + 2),
        text_encoder_2=make_clip_encoder(16, seed + 3, projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=make_scheduler(scheduler),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


@quiet_notes()
def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, dual_attention: bool = False):
    """A ``StableDiffusion3Pipeline`` with SD3's structure: 2 ``JointTransformerBlock``s (4 heads of 8 channels,
    patch size 2; the last block ``context_pre_only``), two CLIP text encoders of width 16 (77 positions, features
    concatenated), a T5 encoder of width 32 with the offline ``t5_tokenizer``, a 4-level VAE (scale factor 8,
    4 latent channels) and a flow-matching Euler scheduler. Text keys: 77 CLIP positions, then
    ``max_sequence_length`` T5 positions (pass a small one, e.g. 16, in tests).

    Args:
        seed: weight seed. dtype: parameter dtype.
        dual_attention: SD3.5's layout: every block also has ``attn2``, an image-only self-attention (not a site).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline


    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=32, dual_attention_layers=(0, 1) if dual_attention else (),
        qk_norm="rms_norm" if dual_attention else None,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=make_flow_vae(seed + 1),
        text_encoder=make_clip_encoder(16, seed + 2, projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=make_clip_encoder(16, seed + 3, projection=True),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=make_t5_encoder(seed + 4),
        tokenizer_3=t5_tokenizer(),
    )
    return finish(pipe, dtype)


@quiet_notes()
def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``FluxPipeline`` with Flux's structure: 1 double-stream ``FluxTransformerBlock`` and 2 single-stream
    ``FluxSingleTransformerBlock``s (2 heads of 8 channels, RoPE over axes (2, 2, 4)), no guidance embedding (as
    Flux-schnell), a CLIP text encoder of width 16 (pooled only), a T5 encoder of width 32 with the offline
    ``t5_tokenizer`` (the text keys: ``max_sequence_length`` positions, text first), a 4-level VAE whose latents
    are packed 2×2 (a 64×96 px image is a 4×6 grid) and a flow-matching Euler scheduler.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel


    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=make_flow_vae(seed + 1),
        text_encoder=make_clip_encoder(16, seed + 2),
        tokenizer=clip_tokenizer(),
        text_encoder_2=make_t5_encoder(seed + 3),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    return finish(pipe, dtype)


@quiet_notes()
def tiny_chroma_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``ChromaPipeline`` with Chroma's structure: Flux's blocks (1 double-stream, 2 single-stream, 2 heads of 8
    channels, RoPE over axes (2, 2, 4)) with pruned modulation from an approximator, one T5 encoder of width 32 with
    the offline ``t5_tokenizer`` whose padding is masked out of the joint attention (``attention_mask``), a 4-level
    VAE with latents packed 2×2, and classifier-free guidance as separate conditional and unconditional calls.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    ).eval()
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=make_flow_vae(seed + 1),
        text_encoder=make_t5_encoder(seed + 2),
        tokenizer=t5_tokenizer(),
        transformer=transformer,
    )
    return finish(pipe, dtype)


@quiet_notes()
def tiny_pixart_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, sigma: bool = False):
    """A ``PixArtAlphaPipeline`` with PixArt-α's structure: 2 DiT blocks (2 heads of 8 channels, patch size 2,
    ``ada_norm_single``) whose ``attn2`` cross-attends to T5 keys with the padding mask, a T5 encoder of width 32
    with the offline ``t5_tokenizer`` (keys: ``max_sequence_length`` positions, default 120), a 4-level VAE and a
    DDIM scheduler. ``sample_size`` 32 (256 px), so that PixArt's resolution binning (on by default) bins to its
    256 px table; pass ``use_resolution_binning=False`` (and ``clean_caption=False``) to run at the given size.

    Args:
        seed: weight seed. dtype: parameter dtype.
        sigma: a ``PixArtSigmaPipeline`` (PixArt-Σ: the same denoiser class and T5 keys, ``max_sequence_length``
            positions, default 300). Default ``False``.
    """
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel


    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=32, patch_size=2, caption_channels=32, norm_num_groups=4,
    ).eval()
    pipe = (PixArtSigmaPipeline if sigma else PixArtAlphaPipeline)(
        tokenizer=t5_tokenizer(),
        text_encoder=make_t5_encoder(seed + 2),
        vae=make_vae(seed + 1),
        transformer=transformer,
        scheduler=make_scheduler("ddim"),
    )
    return finish(pipe, dtype)


@quiet_notes()
def tiny_if_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An ``IFPipeline`` (DeepFloyd IF stage I) with its UNet's structure: a pixel-space ``UNet2DConditionModel`` whose
    ``SimpleCrossAttn`` blocks attend with added-KV attention (``AttnAddedKVProcessor2_0``: image queries over
    ``[text; image]`` keys), a T5 encoder of width 32 with the offline ``t5_tokenizer`` (77 positions, through the
    UNet's text projection) and IF's DDPM scheduler (learned variance). No safety checker or watermarker. Pass
    ``clean_caption=False`` (cleaning needs ``bs4`` and ``ftfy``).

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8,
    ).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", thresholding=True,
                              dynamic_thresholding_ratio=0.95, sample_max_value=1.0, variance_type="learned_range")
    pipe = IFPipeline(tokenizer=t5_tokenizer(), text_encoder=make_t5_encoder(seed + 2), unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    return finish(pipe, dtype)


@quiet_notes()
def tiny_hunyuandit_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``HunyuanDiTPipeline`` with HunyuanDiT's structure: 2 DiT blocks (2 heads of 8 channels, patch size 2) whose
    ``attn2`` cross-attends to a 2-layer BERT encoder of width 32 (standing in for its bilingual CLIP, with the real CLIP
    tokenizer: 77 positions) then a T5 encoder of width 32 (``t5_tokenizer``: 256 positions), a 4-level VAE and a DDIM
    scheduler. Pass ``use_resolution_binning=False`` to run at the given size.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    transformer = HunyuanDiT2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=16,
        activation_fn="gelu-approximate",
    ).eval()
    torch.manual_seed(seed + 2)
    bert = BertModel(BertConfig(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=77, pad_token_id=49407),
                     add_pooling_layer=False).eval()
    pipe = HunyuanDiTPipeline(vae=make_vae(seed + 1), text_encoder=bert, tokenizer=clip_tokenizer(),
                              transformer=transformer, scheduler=make_scheduler("ddim"), safety_checker=None,
                              feature_extractor=None, requires_safety_checker=False,
                              text_encoder_2=make_t5_encoder(seed + 3), tokenizer_2=t5_tokenizer())
    return finish(pipe, dtype)


@quiet_notes()
def tiny_auraflow_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An ``AuraFlowPipeline`` with AuraFlow's structure: 1 joint (MM-DiT) and 1 single-stream block (2 heads of 8
    channels, patch size 2) over ``[8 register tokens; text; image]``, a 1-layer UMT5 encoder of width 32 with the
    offline ``t5_tokenizer``, a 4-level VAE and a flow-matching Euler scheduler.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, out_channels=4, pos_embed_max_size=64,
    ).eval()
    torch.manual_seed(seed + 2)
    encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=t5_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8)).eval()
    pipe = AuraFlowPipeline(tokenizer=t5_tokenizer(), text_encoder=encoder, vae=make_vae(seed + 1),
                            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    return finish(pipe, dtype)


@quiet_notes()
def tiny_cogview3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``CogView3PlusPipeline`` with CogView3-Plus's structure: 2 blocks (2 heads of 8 channels, patch size 2) whose
    ``attn1`` runs over ``[text; image]`` with LayerNorm on q and k, a T5 encoder of width 32 with the offline
    ``t5_tokenizer`` (``max_sequence_length`` positions, not masked), a 4-level VAE and CogVideoX's DDIM scheduler.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8,
    ).eval()
    pipe = CogView3PlusPipeline(tokenizer=t5_tokenizer(), text_encoder=make_t5_encoder(seed + 2), vae=make_vae(seed + 1),
                                transformer=transformer, scheduler=CogVideoXDDIMScheduler(
                                    beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing",
                                    rescale_betas_zero_snr=True, snr_shift_scale=1.0, set_alpha_to_one=True))
    return finish(pipe, dtype)


@quiet_notes()
def tiny_bria_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``BriaPipeline`` with Bria 3.x's structure (Flux's: 1 double- and 2 single-stream blocks, 2 heads of 8
    channels, RoPE over axes (2, 2, 4), latents packed 2×2), a T5 encoder of width 32 with the offline ``t5_tokenizer``
    (each prompt encoded alone, then zero-padded to ``max_sequence_length``), a 4-level VAE and a flow-matching Euler
    scheduler.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=[2, 2, 4],
    ).eval()
    pipe = BriaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=make_flow_vae(seed + 1),
                        text_encoder=make_t5_encoder(seed + 2), tokenizer=t5_tokenizer())
    return finish(pipe, dtype)


@quiet_notes()
def full_size_pipeline(model: str = "sd15", device="cpu", dtype: torch.dtype = torch.float16, seed: int = 0):
    """SD 1.5 or SDXL at full size with seeded random weights, built directly on ``device``: the real UNet
    (``SD15_UNET`` / ``SDXL_UNET``), CLIP ViT-L/14 text encoder(s) (and OpenCLIP bigG for SDXL), the real VAE
    layout and the real CLIP tokenizer. Timings and memory equal those of the real weights; images are noise.

    For benchmarks on a GPU (``benchmarks/gpu.py``); ``device="meta"`` builds the topology without memory.

    Args:
        model: ``"sd15"`` or ``"sdxl"``. device: where to build. dtype: parameter dtype. seed: weight seed.

    Raises:
        ValueError: another model name.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if model not in ("sd15", "sdxl"):
        raise ArgumentError(f"model={model!r} is not 'sd15' or 'sdxl'")
    with torch.device(device):  # the modules only: schedulers keep their tables on the CPU
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(SD15_UNET if model == "sd15" else SDXL_UNET)).eval()
        clip_l = make_clip_encoder(768, seed + 2, layers=12, heads=12, intermediate=3072)
        vae = make_vae(seed + 1, full=True)
        if model == "sdxl":
            big_g = make_clip_encoder(1280, seed + 3, projection=True, layers=32, heads=20, intermediate=5120, act="gelu")
    if model == "sd15":
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=clip_l, tokenizer=clip_tokenizer(), unet=unet, scheduler=make_scheduler("pndm"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=make_scheduler("euler"),
            force_zeros_for_empty_prompt=True,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 or torch.device(device).type == "meta" else pipe.to(dtype=dtype)


# transformer denoisers (SD3, Flux, PixArt-α) and the offline T5-style tokenizer live in their own module


def shapes_pipeline(dtype: torch.dtype = torch.float32):
    """The trained shapes model shipped with attnprobe (``attnprobe.models.shapes.model.load``): a
    ``StableDiffusionPipeline`` generating 32 × 32 px scenes of coloured shapes from captions such as
    ``"a red circle on the left and a blue square on the right"``; no training, no download.
    """
    return load_shapes(dtype)


@quiet_notes()
def tiny_clip(seed: int = 0):
    """A ``CLIPModel`` (text and vision towers of width 32, 2 layers, 32×32 px images in 8×8 patches, projection 16)
    with seeded random weights, and a ``CLIPProcessor`` of the real CLIP tokenizer and an image processor made in
    code (no files). For the presence scorer's tests and the offline study: its scores are plumbing, not meaning.

    Returns:
        ``(model, processor)``, the model in eval mode on the CPU.

        >>> model, processor = tiny_clip()
        >>> model.config.projection_dim, processor.image_processor.crop_size["height"]
        (16, 32)
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    try:  # transformers ≥ 5 without torchvision: the PIL backend (CLIPImageProcessor would warn and fall back to it)
        from transformers.models.clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16,
    )
    # offset: with it the random towers give positive image-text cosines, which CLIPScore does not clip to 0
    torch.manual_seed(seed + 7)
    model = CLIPModel(config).eval()
    images = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer())


def _pixart_sigma(seed: int = 0, dtype: torch.dtype = torch.float32):
    return tiny_pixart_pipeline(seed, dtype, sigma=True)


#: the tiny pipeline of each family, by name (``tiny_pipeline``; ``attnprobe study --model tiny-<name>``)
_BUILDERS = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "chroma": tiny_chroma_pipeline,
    "pixart": tiny_pixart_pipeline,
    "pixart-sigma": _pixart_sigma,
    "sana": tiny_sana_pipeline,
    "qwen": tiny_qwen_pipeline,
    "flux2": tiny_flux2_pipeline,
    "cogview4": tiny_cogview4_pipeline,
    "kolors": tiny_kolors_pipeline,
    "if": tiny_if_pipeline,
    "hunyuandit": tiny_hunyuandit_pipeline,
    "auraflow": tiny_auraflow_pipeline,
    "lumina2": tiny_lumina2_pipeline,
    "zimage": tiny_zimage_pipeline,
    "kandinsky3": tiny_kandinsky3_pipeline,
    "hidream": tiny_hidream_pipeline,
    "hunyuanimage": tiny_hunyuanimage_pipeline,
    "cascade-prior": tiny_cascade_prior_pipeline,
    "cogview3": tiny_cogview3_pipeline,
    "lumina-next": tiny_lumina_next_pipeline,
    "bria": tiny_bria_pipeline,
    "ovis": tiny_ovis_pipeline,
    "flux2-dev": tiny_flux2_dev_pipeline,
    "prx": tiny_prx_pipeline,
    "longcat": tiny_longcat_pipeline,
    "wan": tiny_wan_pipeline,
    "wan2.2": tiny_wan22_pipeline,
    "skyreels-v2": tiny_skyreels_v2_pipeline,
    "cogvideox": tiny_cogvideox_pipeline,
    "hunyuanvideo": tiny_hunyuanvideo_pipeline,
    "ltx": tiny_ltx_pipeline,
    "allegro": tiny_allegro_pipeline,
    "sana-video": tiny_sana_video_pipeline,
    "mochi": tiny_mochi_pipeline,
    "hunyuanvideo-1.5": tiny_hunyuanvideo15_pipeline,
    "kandinsky5": tiny_kandinsky5_pipeline,
    "animatediff": lambda seed=0, dtype=torch.float32: tiny_animatediff_pipeline(seed, dtype, tiny_sd_pipeline),
}
#: the names ``tiny_pipeline`` takes
TINY_PIPELINES: tuple[str, ...] = tuple(_BUILDERS)


def tiny_pipeline(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The tiny pipeline of a family, by name: the real diffusers pipeline and denoiser classes at widths of 8 to 32,
    seeded, offline.

        >>> type(tiny_pipeline("pixart-sigma")).__name__
        'PixArtSigmaPipeline'

    Call them as their diffusers pipelines are called, with the prompt by keyword (``pipe(prompt=...)``: Flux.2's first
    positional argument is an image) and, for speed, a small ``max_sequence_length`` (16) where the pipeline takes
    one, sides of 32–96 px and 2 steps. Some pipelines need more: ``use_resolution_binning=False`` (PixArt, Sana,
    HunyuanDiT, PRX: else the size is binned to their 256–1024 px tables), ``clean_caption=False`` (PixArt, IF: cleaning
    needs ``bs4`` and ``ftfy``), sides that are multiples of 32 (Sana), ``output_type="pt"`` rather than
    ``"latent"`` for IF (pixel space). Kolors needs ``sentencepiece`` installed (diffusers requires it).

    Args:
        name: one of ``TINY_PIPELINES``. seed: weight seed. dtype: parameter dtype. Default fp32.

    Raises:
        ArgumentError: an unknown name (the message lists ``TINY_PIPELINES``).
    """
    if name not in _BUILDERS:
        raise ArgumentError(f"no tiny pipeline {name!r}; there are {list(TINY_PIPELINES)}")
    return _BUILDERS[name](seed=seed, dtype=dtype)
