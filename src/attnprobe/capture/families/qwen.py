"""Qwen-Image (``QwenImageTransformer2DModel``): MM-DiT double-stream blocks whose one softmax runs over
``[text; image]``, with rotary tables of their own for text and image (complex, ``apply_rotary_emb_qwen``) and the
text padding masked out; read at the kernel (``attnprobe.capture.kernel``).

Text keys: Qwen2.5-VL's last hidden states of the prompt inside the pipeline's chat template
(``pipe.prompt_template_encode``: a system instruction, then the user turn), from which the pipeline drops the
template's first ``prompt_template_encode_start_idx`` positions (34 for the real tokenizer) and the padding, then pads
the batch with zeros. The keys are the user's words, then the end of the template (``<|im_end|>``, the assistant turn:
kind ``"template"``), then ``"pad"``.
"""

from .registry import Family, encode_template, first_text_encoder


def _positions(pipe, layout, n_keys: int):
    # as the pipeline: the attended positions (padding out, on either side), then the template's first ones dropped
    kept = [i for i, kind in enumerate(layout.kinds) if kind != "pad"][pipe.prompt_template_encode_start_idx:]
    return kept[:n_keys] + [None] * (n_keys - len(kept))


FAMILY = Family(
    name="qwen",
    title="Qwen-Image (QwenImageTransformer2DModel)",
    denoisers=("QwenImageTransformer2DModel",),
    kinds=("joint",),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=True,
    template=encode_template,
    text_positions=_positions,
)
