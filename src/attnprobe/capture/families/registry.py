"""The record each denoiser family fills in: ``Family``.

A family says, for the denoisers it covers, how to find their sites (which site kinds they have, ``attnprobe.capture
.kinds``, and in what order they run before a probe has seen one call), which text encoders give their text keys
(in key order) and so how every key position is labelled, and — through its kinds — how q and k are read as the model
uses them (norms, rotary embeddings, masks). Everything else of the probe is the same for every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...text.tokens import TokenLayout, select_positions, template_layout

__all__ = ["Family", "first_text_encoder", "unet_order", "chat_rendering", "encode_template"]

#: ``(encoder attribute, tokenizer attribute)`` pairs of a pipeline, in the order of the denoiser's text keys
TextStreams = list[tuple[str, str]]


@dataclass(frozen=True)
class Family:
    """What attnprobe knows about one family of diffusers denoisers.

    Attributes:
        name: short name, e.g. ``"flux"`` (recorded as ``store.meta["family"]``).
        title: the models it covers, for people, e.g. ``"Flux.1 (FluxTransformer2DModel)"``.
        denoisers: names of the ``diffusers`` classes it covers (a subclass belongs to the family too); empty for the
            generic family, which covers every other denoiser.
        kinds: the site kinds its sites may have (``"cross"``, ``"joint"``, ``"single"``); an attention module of
            another kind is not a site.
        text_streams: ``pipe -> [(encoder attribute, tokenizer attribute), …]``: the text encoders whose positions
            are the denoiser's text keys, in key order (SD3: CLIP's 77, then T5's).
        order: ``(denoiser, sites) -> sites`` in execution order before a probe has seen a denoiser call (UNets run
            ``down → mid → up`` while ``named_modules()`` lists ``up_blocks`` first). Default: as listed.
        single_needs_joint: keep ``single`` sites only in a denoiser that also has ``joint`` ones (an MM-DiT); in
            another, a block called with encoder states whose only attention is self-attention is not single-stream.
        reader: how a site's q and k are read: ``"hooks"`` (forward hooks on ``to_q``/``to_k``/``add_k_proj``, then
            the module's norms and rotary embedding as SD3's, Flux's and the UNets' processors apply them:
            ``attnprobe.capture.cross`` and ``.joint``) or ``"kernel"`` (at the processor's one
            ``scaled_dot_product_attention`` call, after everything it applies: ``attnprobe.capture.kernel``).
        text_first: in a joint or single-stream sequence read at the kernel, the text positions come first (Flux,
            Qwen-Image: ``[text; image]``); ``False``: last (``[image; text]``).
        template: for LLM text encoders that read the prompt inside a template: ``(pipe, prompt, n_keys) ->
            [(templated text, where the prompt starts in it, encoded positions or None), …]``, the texts the encoder
            may have read (Sana: with its complex human instruction, or without, as it encodes the negative prompt);
            the one whose tokens are the ids the encoder read is taken.
        registers: ``denoiser -> int``: keys the denoiser puts before the text keys of its joint sequences (AuraFlow's
            register tokens); read at the kernel, they share the softmax with the image keys and are not on the
            ``token`` axis.
        keys_after: ``(denoiser, the denoiser call's keyword arguments) -> int``: keys the denoiser puts right after
            the text keys of its joint sequences in that call (Stable Cascade's pooled text and CLIP image embedding,
            ``clip_seq`` keys each); read at the kernel, they share the softmax with the image keys and are not on the
            ``token`` axis. It raises ``ProbeError`` for a call it cannot read.
        single_blocks: the denoiser's attribute holding single-stream blocks that get the joined ``[text; image]``
            sequence as their ``hidden_states`` (AuraFlow's ``single_transformer_blocks``): structure alone cannot tell
            their attention from image self-attention.
        row_text: the denoiser joins each row's attended text positions (its ``encoder_attention_mask``) with the image
            positions, so where the image starts differs by row (Lumina 2); the keys past a row's text are its image.
        row_calls: the processor calls the attention kernel once per batch row, over ``[image; that row's attended
            text positions]`` (Mochi 1: ``encoder_attention_mask`` picks each row's positions; the padded ones are in
            no softmax of that row); read at the kernel, each call as its row's. A call without that mask is refused.
        pad_to: with ``row_text``, the denoiser pads the image positions and each row's text positions to a multiple of
            this with pad tokens that share the softmax (Z-Image: 32); the sequence is then ``[image; pad; text; pad]``
            (``text_first=False``) and the pad queries are not image positions.
        image_len: ``(denoiser, latent (h, w)) -> int``, the image positions of a row before padding: with ``pad_to``
            (Z-Image), or for a denoiser that pads its image stream with keys of its own (HiDream's non-square
            latents): the queries past it are not image positions.
        matches: for a family that shares its denoiser class with another (DeepFloyd IF's UNet is a
            ``UNet2DConditionModel``): ``denoiser -> bool``, whether an instance is this family's; ``FAMILIES`` lists
            it before the family it shares the class with.
        pipelines: with ``matches``: the pipeline classes (names, or their beginnings) that use it, for the coverage
            table, which knows pipeline classes, not instances.
        site_kind: ``(denoiser, module name, kind from structure or None) -> kind or None``: the family's word on an
            attention module where structure alone is wrong: ``None`` for one structure takes for a site but is not
            (Kandinsky 3 builds its image self-attention and its text pooling with a ``cross_attention_dim``, so
            ``is_cross_attention`` holds for them too), a kind for one structure cannot tell is a site.
        one_prompt: the pipeline takes one prompt per pipeline call, so the study generates its variants one at a time
            (Allegro: diffusers 0.42's VAE decodes one video per call):
            Bria encodes each prompt in a text-encoder call of its own (a probe refuses several); PRX builds the
            timestep of a guided batch for one prompt (diffusers 0.42 fails on several).
        batched_encode: the pipeline encodes the negative prompts and the prompts in one text-encoder call,
            ``[negative × N; prompt × N]`` (PRX), when guidance is on; each half is labelled as its own encode.
        refused: why attnprobe refuses the family's denoisers (``refused.VIDEO_FAMILIES``: what each video denoiser
            lacks): a probe raises before the pipeline runs, naming the pipeline and this reason; ``None`` for a family
            it records.
        text_positions: with ``template``: ``(pipe, layout of the encoding, n_keys) -> positions``, the encoded
            position of each text key (``None``: a key the pipeline added), e.g. Qwen-Image drops its template's
            first 34 positions and the padding. ``layout`` labels keys from both. Default: key ``i`` is encoded position ``i``.
        pieces: in place of ``template``, for a pipeline that tokenizes the parts of its encoder's input each alone
            rather than one templated text (LongCat: a chat-template prefix, the prompt with quoted text one character
            at a time, its padding, then the template's suffix): ``(pipe, tokenizer, prompt, source) -> TokenLayout``
            of every position the encoder reads (kinds ``template``, ``word``, ``pad``), or ``None`` where the
            pipeline's pieces cannot be rebuilt; ``text_positions`` then picks the keys from it.
        keys_from_end: with ``template``, the text keys are the last ``n_keys`` positions of the encoding, key ``i``
            encoded position ``len(ids) − n_keys + i``: the pipeline cuts the template's head by a count of tokens
            that is an argument of its call (HunyuanVideo's ``prompt_template["crop_start"]``, 95 for its Llama
            tokenizer) and pads the rest to ``max_sequence_length``. Without the ids the encoder read
            (``prompt_embeds``) the cut is unknown and nothing is labelled.
        video: for a video denoiser called with 5-D latents: ``(denoiser, sample) -> (latent frames, (pt, ph, pw))``,
            from which ``capture.frames`` makes the query grid ``(qt, qh, qw)``; ``None`` for an image denoiser.
        packed_video: for a video denoiser called with packed latents ``[batch, qt·qh·qw, channel]`` and its grid as
            arguments (LTX-Video): ``(denoiser, the call's keyword arguments) -> ((qt, qh, qw), (pt, ph, pw))``; it
            raises ``ProbeError`` for a call it cannot read. Such a family sets ``video`` too (it is a video family),
            which is then not called.
        text_order: ``(denoiser, the call's keyword arguments) -> (text [batch, n_keys], added [batch, A])``: for a
            denoiser that reorders each row's keys after the image stream by its masks (HunyuanVideo 1.5): where each
            row's ``token``-axis keys and the ``A`` keys it adds (its image tokens; they share the softmax, not on the
            ``token`` axis) sit among the keys after the image (long tensors, positions from the first of them); read
            at the kernel. It raises ``ProbeError`` for a call it cannot read.
        channels_last: with ``video``, the denoiser is called with channel-last latents ``[batch, frame, h, w,
            channel]`` (Kandinsky 5): the latent grid is their axes 2 and 3, not the last two.
        frames_in_batch: with ``video``, the denoiser folds the frames into the batch of its sites (AnimateDiff's
            ``UNetMotionModel``): a site's rows are ``(row, frame)``, row-major, its encoder states one row per
            ``(row, frame)`` (``capture.batch_frames``).
        pipe_refused: ``pipe -> why or None``: a pipeline of a recorded denoiser that attnprobe refuses (Wan 2.2's two
            experts), said before it runs.
    """

    name: str
    title: str
    denoisers: tuple[str, ...]
    kinds: tuple[str, ...]
    text_streams: Callable[[object], TextStreams]
    order: Callable[[torch.nn.Module, list], list] = lambda denoiser, sites: sites
    single_needs_joint: bool = False
    reader: str = "hooks"
    text_first: bool = True
    template: Callable | None = None
    text_positions: Callable | None = None
    matches: Callable | None = None
    registers: Callable | None = None
    keys_after: Callable | None = None
    single_blocks: str | None = None
    row_text: bool = False
    row_calls: bool = False
    pad_to: int = 0
    image_len: Callable | None = None
    pipelines: tuple[str, ...] = ()
    site_kind: Callable | None = None
    one_prompt: bool = False
    batched_encode: bool = False
    refused: str | None = None
    pieces: Callable | None = None
    video: Callable | None = None
    pipe_refused: Callable | None = None
    keys_from_end: bool = False
    packed_video: Callable | None = None
    text_order: Callable | None = None
    channels_last: bool = False
    frames_in_batch: bool = False

    def classes(self) -> tuple[type, ...]:
        """The family's diffusers classes that the installed diffusers has."""
        import diffusers

        return tuple(c for c in (getattr(diffusers, name, None) for name in self.denoisers) if isinstance(c, type))

    def covers(self, denoiser: torch.nn.Module) -> bool:
        """Whether ``denoiser`` is an instance of one of the family's diffusers classes (and is this family's, where
        the class is shared: ``matches``)."""
        classes = self.classes()
        return bool(classes) and isinstance(denoiser, classes) and (self.matches is None or bool(self.matches(denoiser)))

    @property
    def templated(self) -> bool:
        """Whether the family's LLM encoder reads the prompt inside a template (``template`` or ``pieces``)."""
        return self.template is not None or self.pieces is not None

    def encodings(self, pipe, tokenizer, prompt: str, n_keys: int, n_ids: int | None,
                  source: str = "prompt") -> list[TokenLayout]:
        """The layouts of every position the encoder may have read for ``prompt`` (``template``'s candidates, padded
        to ``n_ids`` positions, ``None``: each candidate's own length; or the one of ``pieces``), for ``n_keys`` keys."""
        if self.pieces is not None:
            lay = self.pieces(pipe, tokenizer, prompt, source)
            return [lay] if lay is not None else []
        return [template_layout(tokenizer, templated, start, prompt, n_ids if n_ids is not None else length, source)
                for templated, start, length in (self.template(pipe, prompt, n_keys) if self.template else [])]

    def layout(self, pipe, tokenizer, text: str | None, ids: list[int] | None, n_keys: int,
               source: str = "prompt") -> TokenLayout | None:
        """The token layout of ``n_keys`` text keys that a templated encoding made (``template`` or ``pieces``),
        checked against the ``ids`` the encoder read (``None``: not seen); ``None`` where the family has no template
        or the ids differ from the template's (someone changed the pipeline's template: nothing is labelled from a
        guess)."""
        if not self.templated or text is None or tokenizer is None or not getattr(tokenizer, "is_fast", False):
            return None
        if ids is None and self.template is not None and (
                self.keys_from_end or len(self.template(pipe, text, n_keys)) > 1):
            return None  # prompt_embeds: which template (Sana: with or without its instruction), or cut, is unknown
        for prompt in dict.fromkeys((text, text.lower().strip())):  # Sana and PixArt encode it lower-cased, stripped
            for lay in self.encodings(pipe, tokenizer, prompt, n_keys, len(ids) if ids is not None else None, source):
                if (ids is None or lay.ids == ids) and not (self.keys_from_end and len(lay.ids) < n_keys):
                    positions = (self.text_positions(pipe, lay, n_keys) if self.text_positions
                                 else list(range(len(lay.ids) - n_keys, len(lay.ids))) if self.keys_from_end
                                 else list(range(n_keys)))  # default: key i is encoded position i
                    picked = select_positions(lay, positions)
                    # words the pipeline cut after encoding (Qwen-Image keeps max_sequence_length of 1024 tokens)
                    kept = set(positions)
                    cut = [lay.offsets[p][0] for p, kind in enumerate(lay.kinds) if kind == "word" and p not in kept]
                    if cut and (picked.truncated_at is None or min(cut) < picked.truncated_at):
                        picked.truncated_at = min(cut)
                    return picked
        return None

    def __repr__(self) -> str:
        return f"Family({self.name!r}: {self.title})"


_SENTINEL = "\x00attnprobe\x00"


def chat_rendering(tokenizer, messages, prompt: str, n_keys: int, **options):
    """A ``Family.template`` candidate for a pipeline that renders the prompt with its tokenizer's chat template:
    ``(templated text, where the prompt starts in it, n_keys)``, or ``None`` where the tokenizer's template does not
    take ``messages(text)`` or does not keep the prompt as it is.

    Args:
        tokenizer: the pipeline's tokenizer. messages: ``text -> the chat messages`` the pipeline renders.
        prompt: the prompt. n_keys: text keys. options: ``apply_chat_template``'s (``add_generation_prompt``, …).
    """
    def render(text):
        try:
            return tokenizer.apply_chat_template(messages(text), tokenize=False, **options)
        except Exception:  # a template that takes other messages: not this pipeline's
            return None

    marked, templated = render(_SENTINEL), render(prompt)
    if marked is None or templated is None or _SENTINEL not in marked:
        return None
    start = marked.index(_SENTINEL)
    return (templated, start, n_keys) if templated[start:start + len(prompt)] == prompt else None


def encode_template(pipe, prompt: str, n_keys: int):
    """A ``Family.template`` for pipelines that format the prompt into ``pipe.prompt_template_encode`` (``"…{}…"``:
    Qwen-Image, HunyuanImage): the one candidate, the prompt starting where the template's ``{}`` is."""
    template = pipe.prompt_template_encode
    return [(template.format(prompt), len(template.split("{}")[0]), None)]


def first_text_encoder(pipe) -> TextStreams:
    """The first of ``text_encoder`` / ``text_encoder_2`` the pipeline has (SD 1.x/2.x, SDXL and its refiner, PixArt)."""
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if isinstance(getattr(pipe, enc, None), torch.nn.Module):
            return [(enc, tok)]
    return []


def unet_order(denoiser: torch.nn.Module, sites: list) -> list:
    """A UNet's sites in execution order: ``down_blocks``, ``mid_block``, ``up_blocks`` (``named_modules()`` lists
    ``up_blocks`` before ``mid_block``)."""
    if not all(hasattr(denoiser, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        return sites
    rank = {"down": 0, "mid": 1, "up": 2}
    return sorted(sites, key=lambda s: rank.get(s.group, 3))
