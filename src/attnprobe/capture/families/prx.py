"""PRX (``PRXTransformer2DModel``, Photoroom): every block's ``attention`` attends from the image positions alone over
``[text; image]`` keys in one softmax (the text through its own ``txt_kv_proj`` and ``norm_added_k``, RoPE on the image
queries and keys only, the text padding masked out), so a site is ``joint`` (its map ``exact`` or ``renorm``) read at
the kernel. The text is not updated by the blocks: every site sees the same projected encoder states.

Text keys: the T5Gemma encoder's last hidden states of the prompt as the pipeline cleans it (lower-cased, stripped,
URLs and some punctuation removed: ``TextPreprocessor.clean_text``) and tokenizes it (Gemma: ``<bos>``, the words,
``<eos>``, then padding to ``tokenizer_max_length``, masked). The keys are labelled from the ids the encoder read: where
cleaning changed more than case and spaces, from those ids decoded. Guidance is batched ``[uncond; cond]``, the negative
prompt and the prompt encoded in one encoder call (``batched_encode``). diffusers 0.42's ``PRXPipeline`` builds the
timestep of a guided batch for one prompt (several prompts with guidance fail inside diffusers), so the study generates
its variants one at a time (``one_prompt``).
"""

from .registry import Family, first_text_encoder


def _site_kind(denoiser, name: str, kind):
    # PRXBlock.forward takes encoder_hidden_states, so structure says "single"; its attention gets the image stream as
    # hidden_states and the text apart (queries: the image alone, keys [text; image]): DeepFloyd IF's added-KV kind
    return "joint" if name.startswith("blocks.") and name.endswith(".attention") else None


FAMILY = Family(
    name="prx",
    title="PRX (PRXTransformer2DModel)",
    denoisers=("PRXTransformer2DModel",),
    kinds=("joint",),
    text_streams=first_text_encoder,
    reader="kernel",
    text_first=True,
    site_kind=_site_kind,
    batched_encode=True,
    one_prompt=True,
)
