"""The parts of the tiny pipelines: seeded text encoders (CLIP, T5), VAEs and schedulers built from configs.

    >>> type(make_scheduler("pndm")).__name__
    'PNDMScheduler'
"""

from __future__ import annotations

import types
import unicodedata

import torch

from ..errors import ArgumentError
from .tokenizers import t5_vocab_size

__all__ = ["make_clip_encoder", "make_vae", "make_scheduler", "make_t5_encoder", "make_flow_vae", "finish"]


def make_clip_encoder(hidden: int, seed: int, projection: bool = False, layers: int = 2, heads: int = 2,
                  intermediate: int | None = None, act: str = "quick_gelu", positions: int = 77):
    """A CLIP text encoder with the real CLIP vocabulary (49408 ids, 77 positions) at width ``hidden``, seeded.

    Args:
        hidden: hidden size (and projection size). seed: weight seed. projection: a ``CLIPTextModelWithProjection``
            (SDXL's second encoder, SD3's), else ``CLIPTextModel``. layers, heads, intermediate, act: as in
            ``CLIPTextConfig`` (intermediate default ``2 * hidden``). positions: ``max_position_embeddings`` (77;
            HiDream's Long-CLIP encoders have 248).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=positions,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act=act,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()


def make_vae(seed: int, full: bool = False):
    """A 4-level ``AutoencoderKL`` with 4 latent channels (8× down-sampling), seeded: 8 channels per level, or SD's
    full widths (128–512) with ``full``."""
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


def make_scheduler(name: str):
    """SD 1.5's noise schedule (scaled linear betas 0.00085–0.012, 1000 steps) in scheduler ``name``: ``"ddim"``,
    ``"euler"``, ``"heun"`` or ``"pndm"``.

    Raises:
        ArgumentError: another name (the message lists them).
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    kinds = {
        "ddim": lambda: DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        "euler": lambda: EulerDiscreteScheduler(**common),
        "heun": lambda: HeunDiscreteScheduler(**common),
        "pndm": lambda: PNDMScheduler(**common, skip_prk_steps=True, steps_offset=1),  # as SD 1.5 ships it
    }
    if name not in kinds:
        raise ArgumentError(f"scheduler {name!r} is not one of {sorted(kinds)}")
    return kinds[name]()


def make_t5_encoder(seed: int, d_model: int = 32, layers: int = 2):
    """A ``T5EncoderModel`` over the offline T5 vocabulary (``t5_tokenizer``; pad 0, end 1) at width ``d_model``,
    seeded."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=t5_vocab_size(), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def make_byt5_encoder(seed: int, vocab: int):
    """A 1-layer ``T5EncoderModel`` of width 32 over a ByT5 tokenizer's ``vocab`` bytes, seeded: the glyph encoder of
    HunyuanImage 2.1 and HunyuanVideo 1.5."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()


def make_hunyuan_video_vae(seed: int):
    """HunyuanVideo's causal video VAE (temporal compression 4, spatial 8, 4 latent channels) at width 8, seeded: the
    VAE of HunyuanVideo and of Kandinsky 5."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                     norm_num_groups=4, mid_block_add_attention=False).eval()


def make_flow_vae(seed: int, latent_channels: int = 4):
    """``make_vae``'s tiny VAE with the flow-matching pipelines' latent scaling (shift 0, scale 1), seeded;
    ``latent_channels`` 4 (LongCat's pipeline asks for 16)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=latent_channels, norm_num_groups=4,
        layers_per_block=1, sample_size=64, shift_factor=0.0, scaling_factor=1.0,
    ).eval()


def finish(pipe, dtype):
    """A built pipeline with its progress bar off, in ``dtype``."""
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def ftfy_stand_in(module) -> None:
    """A diffusers pipeline module that cleans every prompt with ``ftfy.fix_text`` whether ftfy is installed or not
    (PRX's; SkyReels-V2's) fails where it is missing (ftfy is not a dependency of attnprobe's tests). Where it is
    missing, the module gets a stand-in: Unicode NFC, which is what ``fix_text`` does to plain ASCII prompts (it
    leaves them as they are)."""
    if not hasattr(module, "ftfy"):
        module.ftfy = types.SimpleNamespace(fix_text=lambda text: unicodedata.normalize("NFC", text))
