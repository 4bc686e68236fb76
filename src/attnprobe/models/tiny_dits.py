"""Tiny pipelines of newer DiT families (PRX): the real diffusers pipeline and denoiser classes and the real
``transformers`` encoder classes at a width of 16, seeded, with the offline ``llm_tokenizer``.
``attnprobe.models.tiny.tiny_pipeline`` builds them by name.

    >>> pipe = tiny_prx_pipeline()
    >>> type(pipe).__name__, type(pipe.text_encoder).__name__
    ('PRXPipeline', 'T5GemmaEncoder')
"""

from __future__ import annotations

import torch

from .components import finish, ftfy_stand_in, make_flow_vae
from .tokenizers import llm_tokenizer

__all__ = ["tiny_prx_pipeline"]


def _t5gemma_encoder(tokenizer, layers: int):
    """A T5Gemma encoder of width 16 (2 heads of 8, 1 key-value head) over ``tokenizer``'s vocabulary, seeded by the
    caller (PRX's text encoder: ``T5GemmaEncoder`` takes the encoder half of a ``T5GemmaConfig``)."""
    from transformers import T5GemmaConfig
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    half = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                num_hidden_layers=layers, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                max_position_embeddings=512, attn_implementation="eager")
    config = T5GemmaConfig(encoder=half, decoder=half, vocab_size=len(tokenizer))
    return T5GemmaEncoder(config.encoder).eval()


def _ftfy_stand_in() -> None:
    """PRX's pipeline cleans every prompt with ``ftfy.fix_text``, even with ``skip_text_cleaning``: ``ftfy_stand_in``."""
    from diffusers.pipelines.prx import pipeline_prx

    ftfy_stand_in(pipeline_prx)


def tiny_prx_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``PRXPipeline`` with PRX's structure: 2 ``PRXBlock`` (2 heads of 8 channels; the image attends over
    ``[text; image]`` keys, RoPE over axes (4, 4) on the image, latents in 2×2 patches), their modulation seeded
    (diffusers starts it at 0, so the attention would never reach the image), a 2-layer T5Gemma encoder of width 16
    (``llm_tokenizer`` with Gemma's ``<bos>``, 16 positions by default: ``tokenizer_max_length``), a 4-level VAE and a
    flow-matching Euler scheduler. Pass ``use_resolution_binning=False`` to run at the given size (else it is binned to
    PRX's 512 px table). Where ftfy is not installed, the pipeline's module gets a stand-in for it (``_ftfy_stand_in``).

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXTransformer2DModel

    _ftfy_stand_in()
    tokenizer = llm_tokenizer(bos=True, max_length=16)
    torch.manual_seed(seed)
    transformer = PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=16, mlp_ratio=2.0,
                                        num_heads=2, depth=2, axes_dim=[4, 4]).eval()
    with torch.no_grad():
        for block in transformer.blocks:
            block.modulation.lin.weight.normal_(0.0, 0.2)
            block.modulation.lin.bias.normal_(0.0, 0.2)
    torch.manual_seed(seed + 2)
    encoder = _t5gemma_encoder(tokenizer, layers=2)
    pipe = PRXPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=encoder,
                       tokenizer=tokenizer, vae=make_flow_vae(seed + 1))
    return finish(pipe, dtype)
