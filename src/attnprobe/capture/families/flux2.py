"""Flux.2 (``Flux2Transformer2DModel``): double-stream joint-attention blocks and parallel single-stream blocks over
one ``[text; image]`` sequence, with 4-axis rotary embeddings (``(t, h, w, l)`` ids); read at the kernel.

Text keys: every position of the LLM encoder's chat-templated prompt (hidden states of several layers stacked along
features, not positions): Flux.2 [dev] reads it after its system message through Mistral 3's processor, Flux.2
[klein] inside Qwen 3's chat template as the user turn. The keys are the template's positions (kind
``"template"``), the user's words, the rest of the template, then padding to ``max_sequence_length`` (not masked:
the padding keys get attention).
"""

from .registry import Family, chat_rendering, first_text_encoder

def _template(pipe, prompt: str, n_keys: int):
    """The chat renderings Flux.2's pipelines use: [klein] (the user turn alone, a generation prompt, no thinking) and
    [dev] (its system message, then the user turn)."""
    from diffusers.pipelines.flux2 import pipeline_flux2

    system = getattr(pipeline_flux2, "SYSTEM_MESSAGE", "")
    out = [chat_rendering(pipe.tokenizer, lambda text: [{"role": "user", "content": text}], prompt, n_keys,
                          add_generation_prompt=True, enable_thinking=False),
           chat_rendering(pipe.tokenizer, lambda text: [{"role": "system", "content": [{"type": "text", "text": system}]},
                                                        {"role": "user", "content": [{"type": "text", "text": text}]}],
                          prompt, n_keys, add_generation_prompt=False)]
    return [r for r in out if r is not None]


FAMILY = Family(
    name="flux2",
    title="Flux.2 [dev], Flux.2 [klein] (Flux2Transformer2DModel)",
    denoisers=("Flux2Transformer2DModel",),
    kinds=("joint", "single"),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=True,
    template=_template,
)
