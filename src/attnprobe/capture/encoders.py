"""Every family's text encoders, read as the pipeline reads them: ``pipeline_encoding`` runs the pipeline's own
``encode_prompt`` once for a prompt, keeps the arguments each text encoder was called with (the ids, the attention
mask, ChatGLM's position ids: whatever the pipeline passed), and calls each encoder again with exactly those and
``output_hidden_states=True`` to get every layer's states of the positions the pipeline encoded. The conditioning is
``encode_prompt``'s own output; its positions are labelled as the probe labels the denoiser's text keys (the family's
template and key positions for LLM encoders; each stream's first positions otherwise).

This is what ``attnprobe.text.compare_text`` and the study's similarity tables read for pipelines whose encoders
``attnprobe.text.encode_text`` does not rebuild (SD3, Flux, PixArt, Sana, Qwen-Image, Flux.2, Z-Image, HiDream, …).

    >>> from attnprobe.testing import tiny_pipeline
    >>> enc = pipeline_encoding(tiny_pipeline("sana"), "a picture of dog")
    >>> enc.encoders[0].name, tuple(enc.encoders[0].hidden_states.shape)[0], tuple(enc.conditioning.shape)[1]
    ('text_encoder', 2, 16)
"""

from __future__ import annotations

import inspect

import torch

from ..errors import ArgumentTypeError, AttnprobeError
from ..text.encode import EncoderStates, TextEncoding
from ..text.tokens import TokenLayout, concat_layouts, token_layout
from .families import family_of
from .sites import denoiser_of

__all__ = ["pipeline_encoding", "ENCODER_ATTRIBUTES"]

#: the pipeline attributes of text encoders, with their tokenizers
ENCODER_ATTRIBUTES = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                      ("text_encoder_3", "tokenizer_3"), ("text_encoder_4", "tokenizer_4"))


def _encode_arguments(pipe, prompt: str) -> dict:
    """The arguments of ``pipe.encode_prompt`` for one prompt, no guidance, one image."""
    method = getattr(pipe, "encode_prompt", None)
    if not callable(method):
        raise AttnprobeError(f"{type(pipe).__name__} has no encode_prompt: attnprobe reads a pipeline's text encoders "
                             "through it (pass the pipeline, not its denoiser)")
    device = getattr(pipe, "_execution_device", None) or torch.device("cpu")
    known = {"prompt": [prompt], "device": device, "num_images_per_prompt": 1, "do_classifier_free_guidance": False,
             "negative_prompt": None, "batch_size": 1}
    # what a pipeline call hands encode_prompt by default (Sana: its complex human instruction, which encode_prompt
    # alone leaves out; max_sequence_length where the two defaults differ)
    called = {name: param.default for name, param in inspect.signature(type(pipe).__call__).parameters.items()
              if param.default is not inspect.Parameter.empty and not name.endswith("_embeds")}
    kwargs = {}
    for name, param in inspect.signature(method).parameters.items():
        if name in known:
            kwargs[name] = known[name]
        elif name in called and name not in ("negative_prompt", "guidance_scale"):
            kwargs[name] = called[name]
        elif name.startswith("prompt_") and name[7:].isdigit():
            kwargs[name] = None  # the pipeline then encodes ``prompt`` with that encoder too
        elif param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise AttnprobeError(f"{type(pipe).__name__}.encode_prompt needs {name!r}, which attnprobe cannot fill in")
    return kwargs


def _conditioning(output) -> torch.Tensor | None:
    """The first ``[1, token, hidden]`` tensor ``encode_prompt`` returned (Z-Image: a list of ``[token, hidden]``)."""
    for value in output if isinstance(output, (tuple, list)) else (output,):
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor) and value[0].ndim == 2:
            value = value[0][None]
        if isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[0] == 1:
            return value
    return None


def _encoder_layout(pipe, family, tok, prompt: str, ids: list[int]) -> TokenLayout | None:
    """The layout of the positions an encoder read: the prompt's tokens, or the prompt inside the family's template;
    ``None`` when neither gives the ids it read (its positions are not labelled, so it is left out)."""
    if tok is None or not getattr(tok, "is_fast", False):
        return None
    for text in dict.fromkeys((prompt, prompt.lower().strip())):
        lay = token_layout(tok, text, len(ids))
        if lay.ids == ids:
            return lay
        for lay in family.encodings(pipe, tok, text, len(ids), len(ids)):
            if lay.ids == ids:
                return lay
    return None


def pipeline_encoding(pipe, prompt: str) -> TextEncoding:
    """One prompt through the pipeline's own ``encode_prompt`` (no guidance, one image), with every layer of each
    text encoder it ran.

    Returns:
        A ``TextEncoding``: ``conditioning`` ``[token, hidden]`` float32, the first tensor ``encode_prompt`` returned
        (the denoiser's text keys for the prompt); ``layout`` its positions' labels; ``encoders`` per encoder whose
        positions are labelled (a fast tokenizer whose tokens are the ids it read) ``[layer, token, hidden]`` float32,
        layer 0 its input embeddings; ``pooled`` ``None``.

    Raises:
        ArgumentTypeError: ``prompt`` is not a string. AttnprobeError: the pipeline has no ``encode_prompt``, or one attnprobe cannot call, or it returned no
            ``[1, token, hidden]`` tensor, or no encoder's positions could be labelled.
    """
    if not isinstance(prompt, str):
        raise ArgumentTypeError(f"pipeline_encoding takes one prompt (str); got {type(prompt).__name__}: call it per "
                                "prompt")
    arguments = _encode_arguments(pipe, prompt)
    family = family_of(denoiser_of(pipe))
    present = [(e, t) for e, t in ENCODER_ATTRIBUTES if isinstance(getattr(pipe, e, None), torch.nn.Module)]
    calls: dict[str, tuple] = {}

    def keeper(name):
        def keep(module, args, kwargs):
            calls.setdefault(name, (args, dict(kwargs)))  # the first call: the prompt (no guidance, no negative)
        return keep

    handles = [getattr(pipe, e).register_forward_pre_hook(keeper(e), with_kwargs=True) for e, _ in present]
    try:
        with torch.no_grad():
            output = pipe.encode_prompt(**arguments)
    finally:
        for h in handles:
            h.remove()
    conditioning = _conditioning(output)
    if conditioning is None:
        raise AttnprobeError(f"{type(pipe).__name__}.encode_prompt returned no [1, token, hidden] conditioning")
    encoders, layouts = [], {}
    for enc_name, tok_name in present:
        if enc_name not in calls:
            continue
        args, kwargs = calls[enc_name]
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            continue
        lay = _encoder_layout(pipe, family, getattr(pipe, tok_name, None), prompt, ids[0].tolist())
        if lay is None:
            continue
        kwargs.update(output_hidden_states=True, return_dict=True)
        with torch.no_grad():
            out = getattr(pipe, enc_name)(*args, **kwargs)
        if not getattr(out, "hidden_states", None):
            continue
        # [batch, token, hidden]; ChatGLM (Kolors) puts the tokens first: [token, batch, hidden]
        hidden = torch.stack([h[0] if h.shape[0] == 1 else h[:, 0] for h in out.hidden_states]).float().cpu()
        encoders.append(EncoderStates(enc_name, lay, hidden, None, None))
        layouts[enc_name] = (getattr(pipe, tok_name), lay)
    if not encoders:
        raise AttnprobeError(f"none of {type(pipe).__name__}'s text encoders read the prompt in a way attnprobe can "
                             "label (a fast tokenizer whose tokens are the ids the encoder read)")
    return TextEncoding(prompt, encoders, conditioning[0].float().cpu(), None,
                        _keys_layout(pipe, family, layouts, prompt, int(conditioning.shape[1])))


def _keys_layout(pipe, family, layouts: dict, prompt: str, n_keys: int) -> TokenLayout:
    """The labels of the conditioning's positions, as the probe labels the denoiser's text keys."""
    streams = [e for e, _ in family.text_streams(pipe)]
    if family.templated and len(streams) == 1 and streams[0] in layouts:
        tok, lay = layouts[streams[0]]
        keys = family.layout(pipe, tok, prompt, lay.ids, n_keys)
        if keys is not None:
            return keys
    parts, left = [], n_keys
    for name in streams:
        if name not in layouts or left <= 0:
            break
        lay = layouts[name][1]
        size = min(len(lay.kinds), left)
        parts.append((name, token_layout(layouts[name][0], lay.text, size) if size < len(lay.kinds) else lay))
        left -= size
    return concat_layouts(parts, n_keys)
