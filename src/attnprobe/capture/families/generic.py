"""Every other text-conditioned diffusers denoiser: sites found from structure alone (cross-attention, joint attention,
and single-stream attention next to joint blocks), text keys by the rules of the known families in turn (a third
encoder: CLIP then T5; a T5 second encoder: T5; else the first encoder). Probes of such a denoiser record
``store.meta["family"] = "generic"``: the labels follow from these rules, not from a family that was checked."""

import torch

from .flux import is_t5
from .registry import Family, first_text_encoder, unet_order


def _any_text_keys(pipe):
    if isinstance(getattr(pipe, "text_encoder_3", None), torch.nn.Module):
        return [("text_encoder", "tokenizer"), ("text_encoder_3", "tokenizer_3")]
    if is_t5(getattr(pipe, "text_encoder_2", None)):
        return [("text_encoder_2", "tokenizer_2")]
    return first_text_encoder(pipe)


FAMILY = Family(
    name="generic",
    title="any other diffusers denoiser (sites found from structure)",
    denoisers=(),
    kinds=("cross", "joint", "single"),
    text_streams=_any_text_keys,
    order=unet_order,
    single_needs_joint=True,
)
