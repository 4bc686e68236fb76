"""Ovis-Image (``OvisImageTransformer2DModel``): Flux's structure (double-stream blocks over ``[text; image]``, then
single-stream blocks, RoPE on both), read at the kernel.

Text keys: Qwen 3's last hidden states of the prompt in its chat template (the user turn holds the pipeline's
``system_prompt`` then the prompt; thinking off), zeroed on padding, from position ``user_prompt_begin_id`` on (28
for the real tokenizer): the end of the system prompt (kind ``template``), the words, the rest of the template, then
``pad`` (zero vectors, not masked: they take attention). Guidance runs as separate calls, conditional first.
"""

from .registry import Family, chat_rendering, first_text_encoder


def _template(pipe, prompt: str, n_keys: int):
    rendered = chat_rendering(pipe.tokenizer, lambda text: [{"role": "user", "content": pipe.system_prompt + text}],
                              prompt, n_keys, add_generation_prompt=True, enable_thinking=False)
    return [rendered] if rendered else []


def _positions(pipe, layout, n_keys: int):
    begin = pipe.user_prompt_begin_id  # the pipeline keeps the encoding from here on
    return list(range(begin, begin + n_keys))


FAMILY = Family(
    name="ovis",
    title="Ovis-Image (OvisImageTransformer2DModel)",
    denoisers=("OvisImageTransformer2DModel",),
    kinds=("joint", "single"),
    text_streams=first_text_encoder,
    single_needs_joint=True,
    reader="kernel",
    text_first=True,
    template=_template,
    text_positions=_positions,
)
