"""AuraFlow (``AuraFlowTransformer2DModel``): MM-DiT joint blocks, then single-stream blocks, over
``[registers; text; image]``: the transformer puts its 8 learned register tokens before the text positions
(``register_tokens``); read at the kernel. The registers share each softmax with the image keys (in ``exact`` maps
their mass is neither the text's nor counted on the ``token`` axis); the text keys are the UMT5 encoder's positions,
padding masked by the encoder only (the joint attention attends to it).
"""

from .registry import Family, first_text_encoder


def _registers(denoiser) -> int:
    tokens = getattr(denoiser, "register_tokens", None)
    return int(tokens.shape[1]) if tokens is not None else 0


FAMILY = Family(
    name="auraflow",
    title="AuraFlow (AuraFlowTransformer2DModel)",
    denoisers=("AuraFlowTransformer2DModel",),
    kinds=("joint", "single"),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=True,
    registers=_registers,
    single_blocks="single_transformer_blocks",
)
