"""DeepFloyd IF (``UNet2DConditionModel`` with added-KV attention) and the other UNets built the same way (UnCLIP,
Kandinsky 2.x): each ``attn2``-like layer projects the text through ``add_k_proj``/``add_v_proj`` and attends from the
image positions over ``[text; image]`` keys in one softmax (``AttnAddedKVProcessor``), so a site is ``joint`` (its map
``exact`` or ``renorm``) read at the kernel; the image keys are the layer's own ``to_k`` of the image.

Text keys: the T5 encoder's positions (IF: 77, padding not masked by the pipeline), through the UNet's text
projection (``encoder_hid_proj``).
"""

import torch

from .registry import Family, first_text_encoder, unet_order


def _added_kv(denoiser: torch.nn.Module) -> bool:
    return any(getattr(m, "add_k_proj", None) is not None and getattr(m, "is_cross_attention", False)
               for m in denoiser.modules())


FAMILY = Family(
    name="deepfloyd",
    title="DeepFloyd IF and other UNets with added-KV attention (UNet2DConditionModel)",
    denoisers=("UNet2DConditionModel",),
    kinds=("joint",),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=True,
    order=unet_order,
    matches=_added_kv,
    pipelines=("IF", "UnCLIP", "Kandinsky"),
)
