"""Z-Image (``ZImageTransformer2DModel``): a noise refiner (image only) and a context refiner (text only), then
``layers`` of self-attention over each row's ``[image; caption]``; read at the kernel. The denoiser takes one latent
and one caption per row (lists: ``attnprobe.capture.denoiser_call`` joins them) and pads the image positions and each
row's caption to a multiple of 32 with learned pad tokens: the pad keys share each softmax (in ``exact`` maps their
mass is neither the text's nor on the ``token`` axis), the pad queries are not image positions. The layers get the
joined sequence as their ``hidden_states``, so the family names them (``single_blocks``).

Text keys: Qwen 3's second-to-last hidden states of the prompt in its chat template (the user turn, then the
assistant's, thinking on), only the attended positions: each row's caption has its own length, and on the ``token``
axis a row's positions past its caption get probability 0. The pipeline puts the prompts' rows before the negative
prompts' (``passes.PROMPT_FIRST``).
"""

import inspect

from .registry import Family, chat_rendering, first_text_encoder

#: the multiple Z-Image pads its image positions and each caption to (diffusers' ``SEQ_MULTI_OF``)
PAD_TO = 32


def _template(pipe, prompt: str, n_keys: int):
    rendered = chat_rendering(pipe.tokenizer, lambda text: [{"role": "user", "content": text}], prompt, n_keys,
                              add_generation_prompt=True, enable_thinking=True)
    return [rendered] if rendered else []


def _image_len(denoiser, hw) -> int:
    # the pipelines call it with forward's default patch_size (2), one of the config's all_patch_size
    patch = inspect.signature(type(denoiser).forward).parameters["patch_size"].default
    return (hw[0] // patch) * (hw[1] // patch)


FAMILY = Family(
    name="zimage",
    title="Z-Image (ZImageTransformer2DModel)",
    denoisers=("ZImageTransformer2DModel",),
    kinds=("single",),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=False,
    template=_template,
    single_blocks="layers",
    row_text=True,
    pad_to=PAD_TO,
    image_len=_image_len,
)
