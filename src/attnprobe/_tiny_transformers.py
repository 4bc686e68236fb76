"""Tiny transformer-denoiser pipelines (SD3, Flux, PixArt-α) built offline with seeded weights, and an offline
T5-style tokenizer. Re-exported by ``attnprobe.testing``; see there.

The tiny models keep each family's structure (SD3: joint blocks, three text encoders, 77 CLIP + T5 keys;
Flux: double-stream then single-stream blocks, RoPE, CLIP pooled + T5 keys, 2×2 packed latents; PixArt: a
``Transformer2DModel``-style DiT with T5 cross-attention and a padding mask) at width 32, so that they run in
milliseconds on a CPU. Weights are random: maps and images show the plumbing, not meaning.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources

import torch

__all__ = ["t5_tokenizer", "tiny_sd3_pipeline", "tiny_flux_pipeline", "tiny_pixart_pipeline", "SD3_MEDIUM_TRANSFORMER",
           "SD35_MEDIUM_TRANSFORMER", "FLUX_DEV_TRANSFORMER", "transformer_on_meta"]

# Real transformer configs (the values of the public transformer/config.json files), for the meta device
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD35_MEDIUM_TRANSFORMER = dict(
    SD3_MEDIUM_TRANSFORMER, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def transformer_on_meta(config: dict):
    """An ``SD3Transformer2DModel`` (or a ``FluxTransformer2DModel`` when ``config`` has ``num_single_layers``) with a
    real config on the ``meta`` device: the topology without weights or memory."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        return (FluxTransformer2DModel if "num_single_layers" in config else SD3Transformer2DModel)(**config)


@lru_cache(maxsize=1)
def _t5_vocab() -> tuple:
    """A Unigram vocabulary in T5's layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then pieces): the whole words of
    the shipped CLIP vocabulary as ``▁word`` pieces (scored by their BPE rank, so frequent words stay whole),
    then single characters with and without ``▁`` as the fallback that spells any other word."""
    folder = resources.files("attnprobe") / "data" / "clip"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    words = sorted((i, w[:-4]) for w, i in vocab.items() if w.endswith("</w>") and w[:-4].isalpha() and w[:-4].isascii())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for rank, (_, word) in enumerate(words):
        for piece, score in (("▁" + word, -3.0), ("▁" + word.capitalize(), -4.0)):  # "dog" and "Dog" stay whole
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, score - math.log(rank + 1)))
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"-()&/"
    for c in chars:
        for piece in (c, "▁" + c):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -20.0))
    return tuple(pieces)


def t5_tokenizer(max_length: int = 512):
    """An offline T5-style fast tokenizer (``transformers.T5Tokenizer``, Unigram with ``▁`` word starts, ``</s>``
    appended, ``<pad>`` padding, character offsets), built in code from the shipped CLIP word list (lower-case and capitalised):
    about 66,000 pieces. Not the real T5 vocabulary (no files are downloaded); the real one loads with ``from_pretrained``.

    Args:
        max_length: ``model_max_length``. Default: 512.

        >>> tok = t5_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("a picture of dog").input_ids)
        ['▁a', '▁picture', '▁of', '▁dog', '</s>']
    """
    import copy

    return copy.deepcopy(_t5_tokenizer(max_length))  # a fresh copy each call (callers may change it)


@lru_cache(maxsize=2)
def _t5_tokenizer(max_length: int):
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=max_length)


def _t5_encoder(seed: int, d_model: int = 32, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(_t5_vocab()), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _flow_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        sample_size=64, shift_factor=0.0, scaling_factor=1.0,
    ).eval()


def _finish(pipe, dtype):
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


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

    from .testing import _text_encoder, clip_tokenizer

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
        vae=_flow_vae(seed + 1),
        text_encoder=_text_encoder(16, seed + 2, projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_text_encoder(16, seed + 3, projection=True),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5_encoder(seed + 4),
        tokenizer_3=t5_tokenizer(),
    )
    return _finish(pipe, dtype)


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

    from .testing import _text_encoder, clip_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(seed + 1),
        text_encoder=_text_encoder(16, seed + 2),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(seed + 3),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    return _finish(pipe, dtype)


def tiny_pixart_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``PixArtAlphaPipeline`` with PixArt-α's structure: 2 DiT blocks (2 heads of 8 channels, patch size 2,
    ``ada_norm_single``) whose ``attn2`` cross-attends to T5 keys with the padding mask, a T5 encoder of width 32
    with the offline ``t5_tokenizer`` (keys: ``max_sequence_length`` positions, default 120), a 4-level VAE and a
    DDIM scheduler. ``sample_size`` 32 (256 px), so that PixArt's resolution binning (on by default) bins to its
    256 px table; pass ``use_resolution_binning=False`` (and ``clean_caption=False``) to run at the given size.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    from .testing import _scheduler, _vae

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=32, patch_size=2, caption_channels=32, norm_num_groups=4,
    ).eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_t5_encoder(seed + 2),
        vae=_vae(seed + 1),
        transformer=transformer,
        scheduler=_scheduler("ddim"),
    )
    return _finish(pipe, dtype)
