"""Tiny pipelines built offline from configs with seeded weights, the real CLIP tokenizer, real UNet
configs for the ``meta`` device, and synthetic stores with known answers; tiny SD3, Flux and PixArt-α pipelines
with an offline T5-style tokenizer (``tiny_sd3_pipeline``, ``tiny_flux_pipeline``, ``tiny_pixart_pipeline``). Used by the tests, the docs and
``attnprobe study --model tiny``.

    >>> pipe = tiny_sd_pipeline(seed=0)
    >>> type(pipe).__name__, pipe.unet.config.cross_attention_dim
    ('StableDiffusionPipeline', 32)

The tiny UNets keep the real block layout (SD 1.5: 16 cross-attention sites with the same names, 4
resolutions; SDXL: ``DownBlock2D`` first, two text encoders) with narrow channels, so they run in
milliseconds on a CPU. Their weights are random: maps and images show the plumbing, not meaning.
``shapes_pipeline`` is the exception: the trained shapes model shipped with attnprobe (docs/shapes-model.md),
whose maps can be scored against ground truth.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import torch

__all__ = [
    "clip_tokenizer",
    "shapes_pipeline",
    "full_size_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_clip",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "tiny_pixart_pipeline",
    "t5_tokenizer",
    "SD3_MEDIUM_TRANSFORMER",
    "SD35_MEDIUM_TRANSFORMER",
    "FLUX_DEV_TRANSFORMER",
    "transformer_on_meta",
    "SD15_UNET",
    "SD21_UNET",
    "SDXL_UNET",
    "unet_on_meta",
    "synthetic_store",
]

# Real UNet configs (the values that differ from UNet2DConditionModel's defaults), from the public
# unet/config.json files of the checkpoints.
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    sample_size=64,
)
SD21_UNET = dict(
    SD15_UNET,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=True,
    sample_size=96,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
)


def unet_on_meta(config: dict):
    """A ``UNet2DConditionModel`` with a real config on the ``meta`` device (no weights, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@lru_cache(maxsize=4)
def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    folder = resources.files("attnprobe") / "data" / "clip"
    with resources.as_file(folder) as path:
        return CLIPTokenizer.from_pretrained(str(path), model_max_length=77, pad_token=pad_token)


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (49,408 ids, 77 positions), from the files shipped with attnprobe.

    ``pad_token="!"`` gives SDXL's second tokenizer. A fresh copy each call (callers may change it).

        >>> clip_tokenizer()("a photo of a cat").input_ids
        [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    import copy

    return copy.deepcopy(_tokenizer(pad_token))


def _text_encoder(hidden: int, seed: int, projection: bool = False, layers: int = 2, heads: int = 2,
                  intermediate: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act=act,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()


def _vae(seed: int, full: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512) if full else (8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32 if full else 4,
        layers_per_block=2 if full else 1,
        sample_size=512 if full else 64,
    ).eval()


def _scheduler(name: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    kinds = {
        "ddim": lambda: DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        "euler": lambda: EulerDiscreteScheduler(**common),
        "heun": lambda: HeunDiscreteScheduler(**common),
        "pndm": lambda: PNDMScheduler(**common, skip_prk_steps=True, steps_offset=1),  # as SD 1.5 ships it
    }
    if name not in kinds:
        raise ValueError(f"scheduler {name!r} is not one of {sorted(kinds)}")
    return kinds[name]()


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
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(32, seed + 2),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


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
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(16, seed + 2),
        text_encoder_2=_text_encoder(16, seed + 3, projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=_scheduler(scheduler),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def shapes_pipeline(dtype: torch.dtype = torch.float32):
    """The trained shapes model shipped with attnprobe (``attnprobe.zoo.shapes_model.load``): a
    ``StableDiffusionPipeline`` generating 32 × 32 px scenes of coloured shapes from captions such as
    ``"a red circle on the left and a blue square on the right"``; no training, no download.
    """
    from .zoo.shapes_model import load

    return load(dtype)


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


def synthetic_store(
    calls: int = 2,
    prompt: str = "a picture of dog",
    grid: tuple[int, int] = (2, 2),
    heads: int = 2,
    sites: int = 1,
    mass: dict[str, list[float]] | None = None,
    spot: dict[str, tuple[int, int]] | None = None,
):
    """A store with known maps, for analysis tests: one conditional sample, 77 CLIP positions.

    Args:
        calls: number of denoiser calls. prompt: the sample's prompt. grid: ``(qh, qw)``. heads, sites: counts.
        mass: per concept, the probability its tokens get at every position, per call (split evenly between
            its positions); the rest goes to the start token. Default: uniform over the 77 positions.
        spot: per concept, one ``(qh, qw)`` position that puts all its mass there instead (for heat maps).

    Returns:
        An ``AttentionStore`` whose ``trajectory`` for each ``mass`` concept equals the given list.
    """
    from .sites import Site
    from .store import AttentionStore, Call, Sample
    from .tokens import find_concept, token_layout

    layout = token_layout(clip_tokenizer(), prompt, 77)
    qh, qw = grid
    maps = torch.full((calls, 1, heads, qh, qw, 77), 1 / 77, dtype=torch.float32)
    if mass:
        maps.zero_()
        maps[..., 0] = 1.0
        for concept, per_call in mass.items():
            pos = sorted({p for occ in find_concept(layout, concept) for p in occ})
            for c, m in enumerate(per_call):
                where = (slice(None),) * 2
                if spot and concept in spot:
                    y, x = spot[concept]
                    share = m * qh * qw
                    maps[c, :, :, y, x, pos] += share / len(pos)
                    maps[c, :, :, y, x, 0] -= share
                else:
                    maps[c][where + (slice(None), slice(None), pos)] += m / len(pos)
                    maps[c, ..., 0] -= m
    site_list = [
        Site(f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2", "cross", heads, 8, "down", f"down_blocks.{i}", i)
        for i in range(sites)
    ]
    store = AttentionStore(
        site_list,
        [Call(i, float(999 - i * 999 // max(calls - 1, 1)), 0, ("cond",)) for i in range(calls)],
        [Sample(0, "cond", 0, 0, 0, prompt)],
        [layout],
        {s.name: maps.clone() for s in site_list},
        {"pipeline": "Synthetic", "denoiser": "Synthetic", "image_size": list(grid), "prompts": [prompt]},
    )
    return store


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
        raise ValueError(f"model={model!r} is not 'sd15' or 'sdxl'")
    with torch.device(device):  # the modules only: schedulers keep their tables on the CPU
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(SD15_UNET if model == "sd15" else SDXL_UNET)).eval()
        clip_l = _text_encoder(768, seed + 2, layers=12, heads=12, intermediate=3072)
        vae = _vae(seed + 1, full=True)
        if model == "sdxl":
            big_g = _text_encoder(1280, seed + 3, projection=True, layers=32, heads=20, intermediate=5120, act="gelu")
    if model == "sd15":
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=clip_l, tokenizer=clip_tokenizer(), unet=unet, scheduler=_scheduler("pndm"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=_scheduler("euler"),
            force_zeros_for_empty_prompt=True,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 or torch.device(device).type == "meta" else pipe.to(dtype=dtype)


# transformer denoisers (SD3, Flux, PixArt-α) and the offline T5-style tokenizer live in their own module
from ._tiny_transformers import (  # noqa: E402
    FLUX_DEV_TRANSFORMER,
    SD3_MEDIUM_TRANSFORMER,
    SD35_MEDIUM_TRANSFORMER,
    t5_tokenizer,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
    transformer_on_meta,
)
