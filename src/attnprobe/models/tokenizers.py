"""Tokenizers that need no download: the real CLIP BPE tokenizer from the files shipped with attnprobe
(``data/clip``), and an offline T5-style tokenizer built in code from the same word list.

    >>> clip_tokenizer()("a photo of a cat").input_ids
    [49406, 320, 1125, 539, 320, 2368, 49407]
"""

from __future__ import annotations

import copy
import json
import math
from functools import lru_cache
from importlib import resources

__all__ = ["clip_tokenizer", "t5_tokenizer", "t5_vocab_size", "llm_tokenizer", "CHAT_TEMPLATE", "DATA"]

#: The package data shipped with attnprobe (``clip/``: CLIP's vocabulary and merges; ``shapes/``: the shapes model).
DATA = resources.files("attnprobe.models") / "data"


@lru_cache(maxsize=4)
def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    folder = DATA / "clip"
    with resources.as_file(folder) as path:
        return CLIPTokenizer.from_pretrained(str(path), model_max_length=77, pad_token=pad_token)


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (49,408 ids, 77 positions), from the files shipped with attnprobe.

    ``pad_token="!"`` gives SDXL's second tokenizer. A fresh copy each call (callers may change it).

        >>> clip_tokenizer()("a photo of a cat").input_ids
        [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    return copy.deepcopy(_tokenizer(pad_token))


@lru_cache(maxsize=1)
def _t5_vocab() -> tuple:
    """A Unigram vocabulary in T5's layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then pieces): the whole words of
    the shipped CLIP vocabulary as ``▁word`` pieces (scored by their BPE rank, so frequent words stay whole),
    then single characters with and without ``▁`` as the fallback that spells any other word."""
    folder = DATA / "clip"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    words = sorted((i, w[:-4]) for w, i in vocab.items() if w.endswith("</w>") and w[:-4].isalpha() and w[:-4].isascii())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for rank, (_, word) in enumerate(words):
        for piece, score in (("▁" + word, -3.0), ("▁" + word.capitalize(), -4.0)):  # "dog" and "Dog" stay whole
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, score - math.log(rank + 1)))
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"-()&/"
    for c in chars:
        for piece in (c, "▁" + c):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -20.0))
    return tuple(pieces)


def t5_tokenizer(max_length: int = 512):
    """An offline T5-style fast tokenizer (``transformers.T5Tokenizer``, Unigram with ``▁`` word starts, ``</s>``
    appended, ``<pad>`` padding, character offsets), built in code from the shipped CLIP word list (lower-case and capitalised):
    about 66,000 pieces. Not the real T5 vocabulary (no files are downloaded); the real one loads with ``from_pretrained``.

    Args:
        max_length: ``model_max_length``. Default: 512.

        >>> tok = t5_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("a picture of dog").input_ids)
        ['▁a', '▁picture', '▁of', '▁dog', '</s>']
    """
    return copy.deepcopy(_t5_tokenizer(max_length))  # a fresh copy each call (callers may change it)


@lru_cache(maxsize=2)
def _t5_tokenizer(max_length: int):
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=max_length)


def t5_vocab_size() -> int:
    """The number of pieces of ``t5_tokenizer``'s vocabulary (the tiny T5 encoders' ``vocab_size``)."""
    return len(_t5_vocab())


#: A Qwen-style chat template (ChatML): ``<|im_start|>role\ncontent<|im_end|>\n`` per message
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: the special tokens of ``llm_tokenizer``: chat turns and vision placeholders (Qwen2.5-VL's config names them)
LLM_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>")


def llm_tokenizer(bos: bool = False, max_length: int = 2048, padding_side: str = "right", position_ids: bool = False):
    """An offline tokenizer in the style of an LLM text encoder's (Qwen, Gemma, Mistral): ``t5_tokenizer``'s pieces
    without T5's appended ``</s>``, the special tokens ``LLM_SPECIALS`` (``<|endoftext|>`` pads, ``<|im_start|>`` /
    ``<|im_end|>`` delimit chat turns), the ChatML ``CHAT_TEMPLATE`` for ``apply_chat_template``, right padding and
    character offsets. Not any real model's vocabulary: for the tiny pipelines of LLM-conditioned families.

    Args:
        bos: prepend ``<bos>`` to every encoding, as Gemma's tokenizer does. Default ``False`` (Qwen's).
        max_length: ``model_max_length``. Default 2048.
        padding_side: ``"right"`` (default) or ``"left"`` (GLM's, ChatGLM's).
        position_ids: also return ``position_ids`` (0, 1, … over the tokens, 0 on padding), as ChatGLM's tokenizer
            does and Kolors' pipeline reads. Default ``False``.

        >>> tok = llm_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("<|im_start|>user a dog<|im_end|>").input_ids)
        ['<|im_start|>', '▁user', '▁a', '▁dog', '<|im_end|>']
    """
    tokenizer = copy.deepcopy(_llm_tokenizer(bos, max_length, position_ids))
    tokenizer.padding_side = padding_side
    return tokenizer


@lru_cache(maxsize=1)
def _with_position_ids():
    """``PreTrainedTokenizerFast`` that also returns ChatGLM's ``position_ids`` (made on first use: transformers is
    imported lazily)."""
    from transformers import PreTrainedTokenizerFast

    class PositionIdsTokenizer(PreTrainedTokenizerFast):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            mask = out.get("attention_mask")
            if hasattr(mask, "cumsum"):  # tensors
                out["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
            return out

    return PositionIdsTokenizer


@lru_cache(maxsize=4)
def _llm_tokenizer(bos: bool, max_length: int, position_ids: bool = False):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_t5_tokenizer(512).backend_tokenizer.to_str())
    backend.add_special_tokens(list(LLM_SPECIALS))
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A" if bos else "$A", pair="<bos> $A $B" if bos else "$A $B",
        special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
    return (_with_position_ids() if position_ids else PreTrainedTokenizerFast)(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        bos_token="<bos>" if bos else None, model_max_length=max_length, padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
