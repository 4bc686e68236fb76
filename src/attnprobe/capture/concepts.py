"""ConceptAttention's concept stream (Helbling et al. 2025, "ConceptAttention: Diffusion Transformers Learn Highly
Interpretable Features", arXiv 2502.04320): concept tokens carried beside the double-stream blocks of a Flux or SD3
transformer.

    >>> from attnprobe.testing import tiny_flux_pipeline
    >>> pipe = tiny_flux_pipeline()
    >>> with concept_stream(pipe, ["dog", "sky"], max_sequence_length=16) as record:
    ...     _ = pipe(prompt="a dog", num_inference_steps=2, height=64, width=64, max_sequence_length=16,
    ...              output_type="latent")
    >>> tuple(record.calls[0].shape)   # [block, sample, concept, qh, qw]
    (1, 1, 2, 4, 4)

Each concept word is encoded alone by the pipeline's own ``encode_prompt`` (padded to ``max_sequence_length`` as a
prompt is) and keeps the first position of its T5 states (the paper's choice for Flux: one token per concept; SD3's
text is ``[CLIP's 77; T5's]`` positions and the concept keeps T5's first, the first that has read the whole word);
the denoiser's ``context_embedder`` maps it into the transformer's width. At every double-stream block
(``FluxTransformerBlock``, SD3's ``JointTransformerBlock``) the concept tokens go through the block's *text-stream*
weights exactly as the prompt's tokens do — ``norm1_context`` (adaLN, modulated by the call's own ``temb``),
``add_q_proj``/``add_k_proj``/``add_v_proj`` with ``norm_added_q``/``norm_added_k``, Flux's rotary embedding of the
text positions (Flux's text ids are all zero, and so are the concepts'), attention, ``to_add_out``,
``norm2_context`` and ``ff_context`` with their gates (SD3's last block has no text output: the stream ends there) —
but their queries attend only to ``[concept; image]`` keys, and nothing the model computes reads them: the image
and the prompt never see the concepts (one-directional), so the pipeline's output is bit-identical.

In each block the concept tokens' attention outputs ``o_c`` (``[sample, concept, head·d]``, before ``to_add_out``) are
compared with the image tokens' attention outputs ``o_x`` (``[sample, N, head·d]``, the input of ``attn.to_out[0]``,
read from the model's own call) by a dot product, and a softmax over concepts gives, per image position, which
concept it is: ``softmax_c(o_x · o_cᵀ)``, summing to 1 over ``concept``. FluxKontextPipeline's input-image tokens,
which follow the generated image's in the image sequence, are keys of the concepts' attention (as of the prompt's)
but get no map: the maps cover the generated image's grid. Single-stream blocks are not used: the
paper (and its code) stops the concept stream after the last double-stream block, where the text and image
streams still have weights of their own; a single-stream block has one set of weights for both.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..errors import ArgumentError, ConceptError, ProbeError, warn
from ..store.axes import as_index
from .denoiser_call import generated_tokens, packed_grid, query_grid
from .sites import denoiser_of

__all__ = ["SUPPORTED", "ConceptRecord", "ConceptStream", "concept_stream", "encode_concepts", "double_blocks"]

#: what the concept stream supports (named in every refusal)
SUPPORTED = ("Flux (FluxTransformer2DModel: FluxTransformerBlock double-stream blocks with FluxAttnProcessor) and SD3 / "
             "SD3.5 (SD3Transformer2DModel: JointTransformerBlock with JointAttnProcessor2_0), as their pipelines "
             "(FluxPipeline, FluxKontextPipeline, StableDiffusion3Pipeline, …) call them")


def _kinds():
    """``{denoiser class: (block class, processor class, tokenizer attribute)}`` of the supported families."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import (FluxAttnProcessor, FluxTransformer2DModel,
                                                                 FluxTransformerBlock)
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    return {FluxTransformer2DModel: (FluxTransformerBlock, FluxAttnProcessor, "tokenizer_2"),
            SD3Transformer2DModel: (JointTransformerBlock, JointAttnProcessor2_0, "tokenizer_3")}


def _kind(denoiser, pipe) -> tuple:
    for cls, kind in _kinds().items():
        if isinstance(denoiser, cls):
            return kind
    raise ProbeError(f"ConceptAttention needs a joint-attention transformer with double-stream blocks; got "
                     f"{type(denoiser).__name__} (pipeline {type(pipe).__name__}). Supported: {SUPPORTED}")


@dataclass
class ConceptRecord:
    """What a concept stream collected.

    Attributes:
        concepts: the concept words, in the order of the ``concept`` axis.
        blocks: the module paths of the double-stream blocks recorded (``"transformer_blocks.18"``), in the order of
            the ``block`` axis.
        calls: one float32 tensor per denoiser call, ``[block, sample, concept, qh, qw]``: the softmax over
            concepts of ``o_x · o_cᵀ`` (sums to 1 over ``concept``); ``sample`` is the call's batch row.
        timesteps: the transformer's ``timestep`` argument per call (Flux: the scheduler's ``t / 1000``).
        batch_cfg: per call, whether its batch is ``[unconditional; conditional]`` rows of classifier-free guidance
            (SD3's ``do_classifier_free_guidance``).
        input_image_tokens: per call, how many image-conditioning tokens followed the generated image's in the image
            sequence (``FluxKontextPipeline``'s input image; 0 otherwise): the maps cover the generated image only.
    """

    concepts: tuple[str, ...]
    blocks: tuple[str, ...]
    calls: list = field(default_factory=list)
    timesteps: list = field(default_factory=list)
    batch_cfg: list = field(default_factory=list)
    input_image_tokens: list = field(default_factory=list)

    def __repr__(self) -> str:  # not every recorded tensor
        return f"ConceptRecord(concepts={list(self.concepts)}, blocks={len(self.blocks)}, calls={len(self.calls)})"


def double_blocks(pipe_or_denoiser) -> list[str]:
    """The module paths of a Flux or SD3 transformer's double-stream blocks (``transformer_blocks.i``), in execution
    order.

    Raises:
        ProbeError: the denoiser is not one the concept stream supports (names ``SUPPORTED``), a block's processor is
            not its family's plain one, or its projections are fused.
    """
    denoiser = denoiser_of(pipe_or_denoiser)
    block_class, processor_class, _ = _kind(denoiser, pipe_or_denoiser)
    names = []
    for i, block in enumerate(denoiser.transformer_blocks):
        name = f"transformer_blocks.{i}"
        processor = getattr(block.attn, "processor", None)
        processor = processor.innermost() if hasattr(processor, "innermost") else processor  # under a probe
        if not isinstance(block, block_class) or type(processor) is not processor_class:
            raise ProbeError(f"{name}: ConceptAttention reads the image's attention output of a {block_class.__name__} "
                             f"with {processor_class.__name__}; got {type(block).__name__} with "
                             f"{type(processor).__name__} (IP-Adapter or a processor of your own). Supported: {SUPPORTED}")
        if getattr(block.attn, "fused_projections", False):
            raise ProbeError(f"{name}: fused QKV projections are not supported; call "
                             "pipe.transformer.unfuse_qkv_projections() first")
        names.append(name)
    return names


def encode_concepts(pipe, concepts: Sequence[str], max_sequence_length: int | None = None) -> tuple[torch.Tensor, int]:
    """Each concept word encoded alone by the pipeline's own ``encode_prompt`` (padded to ``max_sequence_length``
    as a prompt is; ``None``: the default of the pipeline's ``__call__``), the first position of its T5 states kept:
    ``([concept, feature]`` in the encoder's dtype, the length used``)``.

    Raises:
        ArgumentError: no concept, a concept that is not a non-empty string, or two that are the same tokens
            (``"dog"`` and ``"dog "``); ``max_sequence_length`` not an int from 1 to the tokenizer's length.
        ConceptError: a concept the tokenizer cannot encode (only special tokens, or an unknown piece: ``<unk>``).
        ProbeError: an unsupported pipeline, or one without its T5 encoder (SD3 built with ``text_encoder_3=None``).
    """
    if isinstance(concepts, str) or not isinstance(concepts, Sequence) or not concepts:
        raise ArgumentError(f"concepts must be a non-empty list of words (e.g. ['dog', 'sky', 'grass']); got {concepts!r}")
    bad = [c for c in concepts if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ArgumentError(f"concepts must be non-empty strings; got {bad!r} in {list(concepts)!r}")
    twice = sorted({c for c in concepts if list(concepts).count(c) > 1})
    if twice:
        raise ArgumentError(f"concepts {twice!r} are listed more than once in {list(concepts)!r}: each concept is "
                            "one entry of the concept axis; list it once")
    denoiser = denoiser_of(pipe)
    attr = _kind(denoiser, pipe)[2]
    tokenizer = getattr(pipe, attr, None)
    encoder = getattr(pipe, "text_encoder_3" if attr == "tokenizer_3" else "text_encoder_2", None)
    if tokenizer is None or encoder is None or not hasattr(pipe, "encode_prompt"):
        raise ProbeError(f"ConceptAttention encodes concepts with the pipeline's own encode_prompt and its T5 "
                         f"({attr}); {type(pipe).__name__} has none (pass the pipeline, not its transformer, with its T5 "
                         f"encoder). Supported: {SUPPORTED}")
    if max_sequence_length is None:
        parameter = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
        max_sequence_length = parameter.default if parameter is not None else None
    longest = int(getattr(tokenizer, "model_max_length", 512) or 512)
    if (not isinstance(max_sequence_length, int) or isinstance(max_sequence_length, bool)
            or not 1 <= max_sequence_length <= max(longest, 512)):
        raise ArgumentError(f"max_sequence_length must be an int from 1 to {max(longest, 512)} (the pipeline call's); "
                            f"got {max_sequence_length!r}")
    special, seen = set(tokenizer.all_special_ids), {}
    for concept in concepts:  # the tokens the encoder reads: truncated at max_sequence_length, as encode_prompt does
        ids = tokenizer(concept, max_length=max_sequence_length, truncation=True).input_ids
        pieces = tokenizer.convert_ids_to_tokens(ids)
        if not [i for i in ids if i not in special] or tokenizer.unk_token_id in ids:
            raise ConceptError(f"concept {concept!r}: {type(tokenizer).__name__} cannot encode it (pieces {pieces}) at "
                               f"max_sequence_length={max_sequence_length}; pass words its vocabulary holds (no unknown "
                               "pieces, not only special tokens) and a length that keeps them")
        if tuple(ids) in seen:  # "dog" and "dog ": one token sequence, two rows splitting every position's share
            raise ArgumentError(f"concepts {seen[tuple(ids)]!r} and {concept!r} are the same tokens {pieces} for "
                                f"{type(tokenizer).__name__}: list each concept once")
        seen[tuple(ids)] = concept
    options = {"prompt_3": None, "do_classifier_free_guidance": False} if attr == "tokenizer_3" else {}
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt=list(concepts), prompt_2=None, device=denoiser.device,
                                    max_sequence_length=max_sequence_length, **options)[0]
    return embeds[:, embeds.shape[1] - max_sequence_length], max_sequence_length  # T5's first position (SD3: after CLIP's 77)


class ConceptStream:
    """Hooks that carry concept tokens through a Flux or SD3 transformer's double-stream blocks and record, per denoiser
    call, ``softmax_c(o_x · o_cᵀ)`` at the chosen blocks (see the module docstring). The model's own tensors are only
    read: forward hooks on ``attn.to_q``/``to_k``/``to_v`` and a pre-hook on ``attn.to_out[0]`` take the image's q, k,
    v and attention output; the concept stream is computed in a forward hook after each block has run.

    Args:
        denoiser: the ``FluxTransformer2DModel`` or ``SD3Transformer2DModel``. embeds: ``[concept, feature]`` (``encode_concepts``).
        record: the ``ConceptRecord`` to fill (its ``blocks`` are those recorded; the stream runs up to the last).
        conditioning: accept Flux calls whose image sequence appends image-conditioning tokens (FluxKontextPipeline's
            input image) after the generated image's; ``False`` refuses them (``ProbeError``). Default ``True``.
    """

    def __init__(self, denoiser, embeds: torch.Tensor, record: ConceptRecord, pipe=None, length: int = 0,
                 conditioning: bool = True) -> None:
        self.denoiser, self.embeds, self.record, self.conditioning = denoiser, embeds, record, conditioning
        self.pipe, self.length, self.warned = pipe, length, False  # length: the max_sequence_length encoded at
        self.timestep = float("nan")
        names = [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
        self.last = max(names.index(b) for b in record.blocks)
        self.handles: list = []
        self.stream = self.grid = self.n_image = None
        self.extra = 0  # the call's image-conditioning tokens (FluxKontextPipeline's input image)
        self.active = False  # inside a denoiser call
        self.seen: dict = {}
        self.scores: list = []

    def install(self) -> None:
        d = self.denoiser
        self.handles.append(d.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self.handles.append(d.register_forward_hook(self._on_return))
        for i, block in enumerate(d.transformer_blocks[: self.last + 1]):
            attn = block.attn
            self.handles.append(block.register_forward_pre_hook(self._on_block, with_kwargs=True))
            for name in ("to_q", "to_k", "to_v"):
                self.handles.append(getattr(attn, name).register_forward_hook(self._keeper(name)))
            self.handles.append(attn.to_out[0].register_forward_pre_hook(self._keep_output))
            self.handles.append(block.register_forward_hook(self._after_block(i), with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _on_call(self, module, args, kwargs):
        states = kwargs.get("hidden_states", args[0] if args else None)
        unsupported = [k for k in ("controlnet_block_samples", "block_controlnet_hidden_states", "skip_layers")
                       if kwargs.get(k) is not None]
        joint = {k: v for k, v in (kwargs.get("joint_attention_kwargs") or {}).items() if k != "scale"}  # LoRA's
        if unsupported or joint:
            raise ProbeError(f"ConceptAttention: the transformer was called with {unsupported + sorted(joint)} "
                             "(ControlNet residuals or skipped layers change the image between blocks; attention kwargs "
                             "— a mask, IP-Adapter — change its attention); the concept stream reads plain calls only")
        if states.dim() == 4:  # SD3: [sample, channel, h, w] latents, patch × patch per token
            patch = module.config.patch_size
            self.grid, n, self.extra = (states.shape[-2] // patch, states.shape[-1] // patch), None, 0
        elif kwargs.get("img_ids") is not None:  # Flux: packed [sample, token, channel] with their position ids
            n = self._generated(states, kwargs["img_ids"])
        else:
            raise ProbeError("ConceptAttention: the Flux transformer was called without img_ids; call it as "
                             "FluxPipeline does")
        with torch.no_grad():
            embeds = self.embeds.to(device=states.device, dtype=module.context_embedder.weight.dtype)
            self.stream = module.context_embedder(embeds).unsqueeze(0).expand(states.shape[0], -1, -1)
        self.scores, self.active, self.n_image = [], True, n
        # appended with the call's maps (_on_return): a call that raises leaves neither behind
        self.timestep = float(kwargs["timestep"].flatten()[0]) if "timestep" in kwargs else float("nan")
        text = kwargs.get("encoder_hidden_states")
        t5 = text.shape[1] - (77 if states.dim() == 4 else 0) if isinstance(text, torch.Tensor) else None  # SD3: CLIP's 77
        if t5 is not None and self.length and t5 != self.length and not self.warned:
            self.warned = True
            warn(f"ConceptAttention: the concepts were encoded at max_sequence_length={self.length}, but this pipeline "
                 f"call's T5 text has {t5} positions: pass max_sequence_length={t5} to concept_attention, as to the "
                 "pipeline (T5 reads its padding, so a concept's encoding depends on the length)")

    def _generated(self, states: torch.Tensor, img_ids: torch.Tensor) -> int:
        """The generated image's tokens of a Flux call, and its grid (``self.grid``): the leading tokens whose
        ``img_ids`` share the first's first coordinate (0); FluxKontextPipeline appends its input image's tokens after
        them at coordinate 1. Those are image-conditioning tokens: they are keys of the concepts' attention, as of the
        prompt's, but get no map.

        Raises:
            ProbeError: the ids do not match the tokens, the generated tokens do not form the ids' grid, or the
                conditioning tokens come to a stream that refuses them (``conditioning=False``: ``compare=True``).
        """
        ids = img_ids.reshape(-1, img_ids.shape[-1])
        total = states.shape[1]
        if ids.shape[0] != total:
            raise ProbeError(f"ConceptAttention: the Flux transformer got {total} image tokens but img_ids of "
                             f"{ids.shape[0]} positions {tuple(img_ids.shape)}; call it as FluxPipeline does")
        n = generated_tokens(ids)
        self.grid = query_grid(n, tuple(s // 2 for s in packed_grid(ids[:n])))
        if self.grid is None:
            raise ProbeError(f"ConceptAttention: the first {n} of the Flux call's {total} image tokens (img_ids of "
                             f"first coordinate {float(ids[0, 0]):g}) do not fill the grid of their img_ids "
                             f"({packed_grid(ids[:n])} latent); ConceptAttention reads a generated image's grid")
        self.extra = total - n
        if self.extra and not self.conditioning:
            raise ProbeError(f"ConceptAttention(compare=True): this Flux call appends {total - n} image-conditioning "
                             f"tokens (FluxKontextPipeline's input image) to the generated image's {n}; the concept "
                             "maps cover the generated image alone, but the probe beside them cannot tell the two "
                             "apart: pass compare=False")
        return n

    def _on_block(self, module, args, kwargs):
        self.seen = {"temb": kwargs.get("temb"), "emb": kwargs.get("image_rotary_emb"),
                     "text": kwargs.get("encoder_hidden_states")}
        if self.seen["temb"] is None or self.seen["text"] is None:
            raise ProbeError("ConceptAttention: a double-stream block was called without temb or "
                             "encoder_hidden_states as keywords (the transformer's forward passes them so)")

    def _keeper(self, name: str):
        def keep(module, args, output):
            if self.seen and name not in self.seen:
                self.seen[name] = output
        return keep

    def _keep_output(self, module, args):
        if self.seen and "out" not in self.seen:
            self.seen["out"] = args[0]

    def _after_block(self, index: int):
        def after(module, args, kwargs, output):
            seen, self.seen = self.seen, {}
            if not self.active or self.stream is None:  # None: after SD3's last block (no block follows)
                return
            missing = [k for k in ("to_q", "to_k", "to_v", "out") if k not in seen]
            if missing:
                raise ProbeError(f"transformer_blocks.{index}: its processor did not call attn.{missing[0]}; "
                                 f"ConceptAttention reads the plain processors' projections. Supported: {SUPPORTED}")
            with torch.no_grad():
                self.stream, scores = block_step(module, self.stream, seen)
            if f"transformer_blocks.{index}" in self.record.blocks:
                self.scores.append(scores if self.n_image is None else scores[..., : self.n_image])
        return after

    def _on_return(self, module, args, output):
        if not self.active:
            return
        scores = torch.stack(self.scores)                     # [block, sample, concept, N]
        maps = scores.softmax(dim=2).unflatten(-1, self.grid)  # [block, sample, concept, qh, qw]
        self.record.calls.append(maps.cpu())
        self.record.timesteps.append(self.timestep)
        self.record.input_image_tokens.append(self.extra)
        self.record.batch_cfg.append(bool(getattr(self.pipe, "do_classifier_free_guidance", False)) if self.pipe
                                     is not None and maps.shape[1] % 2 == 0 else False)
        self.stream, self.scores, self.active = None, [], False


def _rotary(x: torch.Tensor, emb, rows: slice | None) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` on ``x`` ``[sample, seq, head, d]`` with the table's ``rows`` (``None``: the
    text's first row for every position: the concepts sit at the text's position id)."""
    from diffusers.models.embeddings import apply_rotary_emb

    if emb is None:
        return x
    cos, sin = emb
    if rows is None:
        cos, sin = cos[:1].expand(x.shape[1], -1), sin[:1].expand(x.shape[1], -1)
    else:
        cos, sin = cos[rows], sin[rows]
    return apply_rotary_emb(x, (cos, sin), sequence_dim=1)


def block_step(block, stream: torch.Tensor, seen: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One double-stream block's step of the concept stream.

    Args:
        block: the ``FluxTransformerBlock`` or ``JointTransformerBlock``. stream: the concept hidden states entering it, ``[sample, concept, D]``.
        seen: what the block's own call gave: ``temb``, ``emb`` (the rotary table of ``[text; image]``), ``text`` (its
            ``encoder_hidden_states``), ``to_q``/``to_k``/``to_v`` (the image projections) and ``out`` (the image's
            attention output, the input of ``attn.to_out[0]``).

    Returns:
        ``(stream, scores)``: the concept hidden states leaving the block ``[sample, concept, D]`` (``None`` after a
        block without a text output, SD3's last) and the float32 scores ``o_c · o_xᵀ`` ``[sample, concept, N]``.

    Raises:
        ProbeError: the text positions have different rotary angles (the concepts' position would be unknown).
    """
    attn, temb, emb = block.attn, seen["temb"], seen["emb"]
    n_text = seen["text"].shape[1]
    if emb is not None and not (torch.equal(emb[0][:n_text], emb[0][:1].expand(n_text, -1))
                                and torch.equal(emb[1][:n_text], emb[1][:1].expand(n_text, -1))):
        raise ProbeError("ConceptAttention: the text positions have different rotary angles (txt_ids not all "
                         "equal); the concept tokens' position is unknown. Flux's pipelines give zeros")
    last = bool(getattr(block, "context_pre_only", False))  # SD3's last block: adaLN without gates, no text output
    if last:
        normed = block.norm1_context(stream, temb)
    else:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(stream, emb=temb)
    heads = lambda x: x.unflatten(-1, (attn.heads, -1))  # noqa: E731  [sample, seq, head, d]
    norm = lambda name, x: x if getattr(attn, name, None) is None else getattr(attn, name)(x)  # noqa: E731
    query = _rotary(norm("norm_added_q", heads(attn.add_q_proj(normed))), emb, None)
    key = _rotary(norm("norm_added_k", heads(attn.add_k_proj(normed))), emb, None)
    value = heads(attn.add_v_proj(normed))
    image = slice(n_text, None)
    image_key = _rotary(norm("norm_k", heads(seen["to_k"])), emb, image)
    keys = torch.cat([key, image_key], dim=1).transpose(1, 2)          # [sample, head, concept + N, d]
    values = torch.cat([value, heads(seen["to_v"])], dim=1).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), keys, values)
    out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)            # o_c: [sample, concept, head·d]
    scores = torch.einsum("scd,snd->scn", out.float(), seen["out"].float())
    if last:
        return None, scores
    stream = stream + gate_msa.unsqueeze(1) * attn.to_add_out(out)
    normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    stream = stream + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    if stream.dtype == torch.float16:
        stream = stream.clip(-65504, 65504)
    return stream, scores


def check_blocks(names: list[str], blocks) -> tuple[str, ...]:
    """The chosen double-stream blocks: ``None`` (all), or indices / module paths of ``names``.

    Raises:
        ArgumentError: an index or name that is not a double-stream block (lists those that exist).
    """
    if blocks is None:
        return tuple(names)
    single = isinstance(blocks, str) or as_index(blocks) is not None
    if not single and isinstance(blocks, torch.Tensor) or type(blocks).__module__ == "numpy":
        blocks = blocks.tolist()  # np.arange(15, 19), torch.arange(…)
    if not single and not isinstance(blocks, (list, tuple, range)):
        raise ArgumentError(f"blocks={blocks!r}: give None, a block index or module path, or a list or range of them "
                            f"(there are {len(names)}: indices 0..{len(names) - 1})")
    out = []
    for b in [blocks] if single else list(blocks):
        index = as_index(b)
        name = f"transformer_blocks.{index}" if index is not None else b
        if name not in names:
            raise ArgumentError(f"blocks: {b!r} is not a double-stream block; there are {len(names)} "
                                f"(indices 0..{len(names) - 1}: {names[0]} … {names[-1]})")
        if name not in out:
            out.append(name)
    if not out:
        raise ArgumentError(f"blocks: {blocks!r} chose no block; pass None (all {len(names)}) or indices")
    return tuple(sorted(out, key=names.index))


@contextlib.contextmanager
def concept_stream(pipe, concepts: Sequence[str], blocks=None, max_sequence_length: int | None = None,
                   conditioning: bool = True) -> Iterator[ConceptRecord]:
    """Carry ``concepts`` through a Flux or SD3 transformer's double-stream blocks while the pipeline runs as usual.

    Args:
        pipe: a Flux or SD3 pipeline (its ``encode_prompt`` encodes the concepts). concepts: words, in the ``concept``
            axis's order. blocks: ``None`` (every double-stream block), or indices / module paths. Default ``None``.
        max_sequence_length: the padded length the concepts are encoded at (as the pipeline's argument of that
            name; pass the same value as the pipeline call). Default ``None``: the pipeline's default (FluxPipeline's
            512, StableDiffusion3Pipeline's 256).
        conditioning: accept Flux calls with image-conditioning tokens after the generated image's
            (FluxKontextPipeline's input image: keys of the concepts' attention, no map). Default ``True``.

    Yields:
        A ``ConceptRecord``, one ``[block, sample, concept, qh, qw]`` tensor per denoiser call.

    Raises:
        ProbeError (unsupported denoiser), ArgumentError, ConceptError: see ``double_blocks``, ``check_blocks``,
        ``encode_concepts``.
    """
    names = double_blocks(pipe)
    chosen = check_blocks(names, blocks)
    embeds, length = encode_concepts(pipe, concepts, max_sequence_length)
    record = ConceptRecord(tuple(concepts), chosen)
    stream = ConceptStream(denoiser_of(pipe), embeds, record, pipe, length, conditioning)
    try:
        stream.install()
        yield record
    finally:
        stream.remove()
