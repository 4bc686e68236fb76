"""Encode a prompt as the pipeline does: ``encode_text`` runs the pipeline's own tokenizer(s) and text encoder(s) and
builds the conditioning exactly as the pipeline's ``encode_prompt`` does (SD 1.x/2.x: the last hidden state, or
``clip_skip`` layers earlier through the final layer norm; SDXL: both encoders' penultimate hidden states
concatenated, plus the pooled projection of the second; T5: the last hidden state). It also keeps every layer's
hidden states and every layer's self-attention probabilities.

    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> enc = encode_text(tiny_sd_pipeline(), "a picture of dog")
    >>> tuple(enc.conditioning.shape), tuple(enc.encoders[0].hidden_states.shape)   # [token, hidden], [layer, token, hidden]
    ((77, 32), (3, 77, 32))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ArgumentError, ArgumentTypeError, AttnprobeError
from .tokens import TokenLayout, token_layout

__all__ = ["EncoderStates", "TextEncoding", "encode_text", "text_unsupported"]


@dataclass
class EncoderStates:
    """One text encoder's view of a prompt.

    Attributes:
        name: the pipeline attribute (``text_encoder``, ``text_encoder_2``).
        layout: token strings, kinds and offsets of its tokenizer.
        hidden_states: ``[layer, token, hidden]`` float32; layer 0 is the input embeddings, the last is the
            final layer's output (before CLIP's final layer norm).
        attentions: ``[layer, head, token, token]`` self-attention probabilities (rows sum to 1 over the last
            axis), computed in the encoder's own dtype and returned as float32, or ``None`` when not asked for.
        pooled: ``[hidden]`` the encoder's pooled output (CLIP: final-normed end token; with projection: the
            projected one), or ``None`` (T5).
    """

    name: str
    layout: TokenLayout
    hidden_states: torch.Tensor
    attentions: torch.Tensor | None
    pooled: torch.Tensor | None


@dataclass
class TextEncoding:
    """A prompt as the denoiser is told it.

    Attributes:
        prompt: the text. encoders: every text encoder's states.
        conditioning: ``[token, hidden]`` float32, exactly the ``encoder_hidden_states`` the pipeline passes to
            the denoiser for this prompt.
        pooled: SDXL's pooled projection ``[hidden]`` (``add_text_embeds``), else ``None``.
        layout: the token layout of the conditioning's positions (the first tokenizer's).
    """

    prompt: str
    encoders: list[EncoderStates]
    conditioning: torch.Tensor
    pooled: torch.Tensor | None
    layout: TokenLayout


#: the encoder classes whose states ``encode_text`` rebuilds as the pipelines use them (by class-name prefix)
TEXT_ENCODERS = ("CLIPTextModel", "T5EncoderModel", "UMT5EncoderModel")


def text_unsupported(pipe) -> str | None:
    """Why ``encode_text`` cannot rebuild this pipeline's text encoding, or ``None`` when it can: it reads CLIP and
    T5 encoders as SD 1.x/2.x, SDXL, SD3, Flux and PixArt read them; LLM encoders (Qwen-Image's Qwen2.5-VL, Sana's
    Gemma 2, Kolors' ChatGLM, …) read the prompt inside a template or pad it their own way."""
    others = [f"{name} is {type(getattr(pipe, name)).__name__}" for name in ("text_encoder", "text_encoder_2",
                                                                               "text_encoder_3")
              if isinstance(getattr(pipe, name, None), torch.nn.Module)
              and not type(getattr(pipe, name)).__name__.startswith(TEXT_ENCODERS)]
    if others:
        return (f"attnprobe.text rebuilds the encodings of CLIP and T5 text encoders only; {type(pipe).__name__}'s "
                + ", ".join(others))
    return None


def _encoders(pipe):
    reason = text_unsupported(pipe)
    if reason:
        raise AttnprobeError(reason)
    found = []
    for enc_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")):
        enc, tok = getattr(pipe, enc_name, None), getattr(pipe, tok_name, None)
        if isinstance(enc, torch.nn.Module) and tok is not None:
            found.append((enc_name, enc, tok))
    if not found:
        raise AttnprobeError(
            f"{type(pipe).__name__} has no text encoder with a tokenizer (looked for text_encoder/tokenizer, "
            "text_encoder_2/tokenizer_2): the text analysis needs the pipeline's own text encoder"
        )
    return found


def _run_encoder(enc, ids, attention_mask, attentions: bool):
    kwargs = dict(output_hidden_states=True)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    with torch.no_grad():
        out = enc(ids, **kwargs)
        probs = None
        if attentions:
            impl = getattr(enc.config, "_attn_implementation", None)
            try:
                if impl not in (None, "eager"):
                    enc.set_attn_implementation("eager")  # only eager returns probabilities
                probs = enc(ids, output_attentions=True, **kwargs).attentions
            finally:
                if impl not in (None, "eager"):
                    enc.set_attn_implementation(impl)
    return out, probs


def encode_text(pipe, prompt: str, *, attentions: bool = True, clip_skip: int | None = None,
                mask_positions: list[int] | None = None, mask_with: str | None = None) -> TextEncoding:
    """Encode one prompt through the pipeline's tokenizer(s) and text encoder(s), as its ``encode_prompt`` does.

    Args:
        pipe: a diffusers pipeline with ``text_encoder`` (and ``text_encoder_2`` for SDXL).
        prompt: the text.
        attentions: also return every layer's self-attention probabilities. Default: True.
        clip_skip: as the pipeline's ``clip_skip``. Default: None (the pipeline's default).
        mask_positions: token positions whose ids are replaced by the tokenizer's padding id (ablation: the
            position then carries the padding embedding). CLIP pools at the first end-token id, and SD 1.x pads
            with the end token, so with SD 1.x's tokenizer a masked position also moves ``pooled``. Default: none.
        mask_with: a word of one token (in every tokenizer of the pipeline) whose id replaces the masked
            positions instead of the padding id, e.g. ``"thing"``. Default: None (the padding id).

    Returns:
        A ``TextEncoding`` (conditioning ``[token, hidden]``, per encoder ``[layer, token, hidden]``).

    Raises:
        AttnprobeError: the pipeline has no text encoder, or one that is not a CLIP or T5 encoder
            (``text_unsupported``). ArgumentError (a ValueError): a bad ``clip_skip``,
            ``mask_positions`` or ``mask_with`` (not one token). ArgumentTypeError: ``prompt`` is not a string.
    """
    if not isinstance(prompt, str):
        raise ArgumentTypeError(f"encode_text takes one prompt (str); got {type(prompt).__name__}: call it per prompt")
    if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 0):
        raise ArgumentError(f"clip_skip={clip_skip!r} must be None or an int ≥ 0")
    encoders = _encoders(pipe)
    # SDXL (and its refiner, which has only text_encoder_2): penultimate states of each encoder, concatenated
    sdxl = "XL" in type(pipe).__name__ and any(name == "text_encoder_2" for name, _, _ in encoders)
    states, parts, pooled_xl = [], [], None
    for name, enc, tok in encoders:
        n = int(tok.model_max_length) if tok.model_max_length < 100_000 else 77
        layout = token_layout(tok, prompt, n)
        ids = torch.tensor([layout.ids])
        if mask_positions:
            bad = [p for p in mask_positions if not isinstance(p, int) or not 0 <= p < n]
            if bad:
                raise ArgumentError(f"mask_positions {bad} are not positions 0..{n - 1}")
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            if mask_with is not None:
                word = tok(mask_with, add_special_tokens=False).input_ids
                if len(word) != 1:
                    raise ArgumentError(f"mask_with={mask_with!r} is {len(word)} tokens for {name}'s tokenizer; give a "
                                     "word of one token (e.g. 'thing')")
                pad = word[0]
            ids[0, list(mask_positions)] = pad
        device = next(enc.parameters()).device
        ids = ids.to(device)
        mask = None
        if getattr(enc.config, "use_attention_mask", False) or type(enc).__name__.startswith("T5"):
            mask = torch.tensor([[k != "pad" for k in layout.kinds]], dtype=torch.long, device=device)
        out, probs = _run_encoder(enc, ids, mask, attentions)
        layers = out.hidden_states
        if not layers:  # a 0-layer encoder (the shapes model's): transformers records no hidden state
            embeddings = getattr(getattr(enc, "text_model", enc), "embeddings", None)
            if embeddings is None:
                raise AttnprobeError(f"{name} ({type(enc).__name__}) returned no hidden states")
            with torch.no_grad():
                layers = (embeddings(input_ids=ids),)  # layer 0: the input embeddings
        depth = len(layers) - (2 if sdxl else 1)
        if clip_skip is not None and clip_skip >= depth:
            raise ArgumentError(f"clip_skip={clip_skip} skips all of {name}'s {len(layers) - 1} layers; "
                             f"use 0..{depth - 1}")
        hidden = torch.stack([h[0] for h in layers]).float().cpu()
        pooled = None
        if getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds[0].float().cpu()
        elif getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output[0].float().cpu()
        attn = torch.stack([a[0] for a in probs]).float().cpu() if probs else None
        states.append(EncoderStates(name, layout, hidden, attn, pooled))
        if sdxl:
            parts.append(out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)][0])
            if name == "text_encoder_2":
                pooled_xl = out[0][0].float().cpu()
        elif not parts:  # SD 1.x/2.x, T5 pipelines: the first encoder conditions the denoiser
            if clip_skip is None:
                parts.append(out[0][0])
            else:
                # transformers ≥ 5 keeps final_layer_norm on the model itself; earlier, under .text_model
                norm = getattr(getattr(enc, "text_model", enc), "final_layer_norm")
                parts.append(norm(out.hidden_states[-(clip_skip + 1)])[0])
    dtype = encoders[0][1].dtype
    conditioning = torch.cat([p.to(dtype) for p in parts], dim=-1).float().cpu()
    return TextEncoding(prompt, states, conditioning, pooled_xl, states[0].layout)
