"""Tiny pipelines of the UNet denoisers that are not ``UNet2DConditionModel``: Kandinsky 3 and Stable Cascade's prior.
Built offline from configs with seeded weights, as ``attnprobe.models.tiny``'s.
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from .components import finish, make_clip_encoder, make_t5_encoder
from .tokenizers import clip_tokenizer, t5_tokenizer

__all__ = ["tiny_kandinsky3_pipeline", "tiny_cascade_prior_pipeline"]


@quiet_notes()
def tiny_kandinsky3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``Kandinsky3Pipeline`` with Kandinsky 3's UNet layout: 4 levels of 8–16 channels, cross-attention blocks (4 heads
    of 4 channels) in the 3 lower ones next to their image self-attention, 2 per block (12 sites), the text pooled into the time embedding; a T5 encoder of width 32
    (``t5_tokenizer``, 128 positions, cut by the pipeline to one past the longest prompt), a 4-level ``VQModel`` (8×)
    and a DDPM scheduler. Sides are rounded up to multiples of 64 px by the pipeline (a 64 × 96 request gives
    64 × 128).

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import DDPMScheduler, Kandinsky3Pipeline, Kandinsky3UNet, VQModel

    torch.manual_seed(seed)
    unet = Kandinsky3UNet(
        in_channels=4, time_embedding_dim=16, groups=2, attention_head_dim=4, layers_per_block=2,
        block_out_channels=(8, 16, 16, 16), cross_attention_dim=16, encoder_hid_dim=32,
    ).eval()
    torch.manual_seed(seed + 1)
    movq = VQModel(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=2,
        num_vq_embeddings=16, vq_embed_dim=4,
    ).eval()
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=1.0,
                              thresholding=False, variance_type="fixed_small", prediction_type="epsilon")
    pipe = Kandinsky3Pipeline(tokenizer=t5_tokenizer(), text_encoder=make_t5_encoder(seed + 2), unet=unet,
                              scheduler=scheduler, movq=movq)
    return finish(pipe, dtype)


@quiet_notes()
def tiny_cascade_prior_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``StableCascadePriorPipeline`` with Stable Cascade's prior layout (``stabilityai/stable-cascade-prior``): a
    ``StableCascadeUNet`` of 2 levels at one resolution (``switch_level=(False,)``), each a residual, a timestep and an
    attention block (``self_attn=True``: image queries over ``[image; clip]`` keys) down and up, 4 sites of 2 heads of 8
    channels; the clip conditioning of CLIP's 77 positions, the pooled text and the image embedding, ``clip_seq=4`` keys
    each; a CLIP text encoder with projection of width 32 (``clip_tokenizer``) and the Würstchen scheduler. Its output
    is image embeddings (16 channels), not an image; the latent side is the pixel side over ``resolution_multiple``
    (16 here, 42.67 in the real pipeline), rounded up: 64 × 96 px give a 4 × 6 latent.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import DDPMWuerstchenScheduler, StableCascadePriorPipeline, StableCascadeUNet

    torch.manual_seed(seed)
    prior = StableCascadeUNet(
        in_channels=16, out_channels=16, timestep_ratio_embedding_dim=8, conditioning_dim=16,
        block_out_channels=(16, 16), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), clip_text_in_channels=32, clip_text_pooled_in_channels=32,
        clip_image_in_channels=16, clip_seq=4, switch_level=(False,), dropout=(0.1, 0.1), self_attn=True,
    ).eval()
    pipe = StableCascadePriorPipeline(tokenizer=clip_tokenizer(), text_encoder=make_clip_encoder(32, seed + 1, projection=True),
                                      prior=prior, scheduler=DDPMWuerstchenScheduler(), resolution_multiple=16)
    return finish(pipe, dtype)
