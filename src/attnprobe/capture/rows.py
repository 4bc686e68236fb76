"""The rows of a denoiser batch: which are the conditional / unconditional passes of classifier-free guidance (or
another pass), which prompt and image each row belongs to, and each row's token layout.

``BatchRows`` learns it from what the pipeline was given (its ``__call__`` frame: ``prompt``, ``negative_prompt``,
whether embeddings were passed), from the token ids its text encoders saw (the probe hands each encode to
``encoded``), and from the pipeline's ``do_classifier_free_guidance``. diffusers puts the unconditional rows first
(``torch.cat([uncond, cond])``). ``label`` gives one pipeline call's ``BatchLabels``; a probe holds one sample layout,
so every later pipeline call must label the same.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..errors import ProbeError, SampleLayoutError, warn
from ..store.records import Sample
from ..text.tokens import TokenLayout, unlabelled_layout
from .evidence import encodings, same_rows, verdicts
from .families import family_of
from .layouts import stream_layout
from .passes import blocks, guidance_on, guider_on, refuse
from .sites import DENOISER_ATTRS

__all__ = ["BatchRows", "BatchLabels", "as_texts"]


def as_texts(value) -> list[str] | None:
    """A prompt argument as a list of texts (one string → one text), or ``None`` when it is not text."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


#: the warning of samples whose conditioning changed inside a pipeline call (BatchRows.lose)
_CHANGED = ("the conditioning of samples {} changed inside the pipeline call (a callback_on_step_end edited "
            "prompt_embeds?)")


def _claims(order, n: int, per_prompt: int) -> list[tuple[str, str, int, int]]:
    """Per batch row ``(pass, text, prompt, image)`` of blocks ``order`` (``(pass, text)`` each) of ``n`` rows, one
    per prompt and image. A safety row's prompt is the prompt whose sample it guides; its text the one concept."""
    return [(p, text, *divmod(j, per_prompt)) for p, text in order for j in range(n)]


def _pipeline(obj) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)



def _embeds(loc: dict, name: str):
    """``prompt_embeds`` or ``negative_prompt_embeds`` of a pipeline's ``__call__`` locals, or Kandinsky 5's names for
    its text keys (``prompt_embeds_qwen``: its CLIP's ``prompt_embeds_clip`` is a pooled vector)."""
    value = loc.get(name)
    return value if value is not None else loc.get(f"{name}_qwen")



def _tokenizer(tok):
    """A pipeline's tokenizer, or the tokenizer inside its processor (Kandinsky 5's ``tokenizer`` is a Qwen2-VL
    processor, which tokenizes text with its ``tokenizer``)."""
    inner = getattr(tok, "tokenizer", None)
    return inner if not hasattr(tok, "convert_ids_to_tokens") and hasattr(inner, "convert_ids_to_tokens") else tok

@dataclass(frozen=True)

class BatchLabels:
    """One pipeline call's denoiser batch, labelled.

    Attributes:
        passes: the pass of every batch row (``attnprobe.capture.passes.PASS_LABELS``), e.g. ``("uncond", "cond")``.
        keep: the batch rows the probe records (those of its ``passes``), in order.
        samples: one ``Sample`` per kept row. layouts: their token layouts (``attnprobe.text.tokens``).
        meta: ``prompts``, ``negative_prompts``, ``num_images_per_prompt``, ``guidance``, ``separate_uncond_calls``.
        first: the probe's first pipeline call (its samples become the store's).
    """

    passes: tuple[str, ...]
    keep: list[int]
    samples: list[Sample]
    layouts: list[TokenLayout]
    meta: dict
    first: bool


class BatchRows:
    """Labels the rows of the denoiser batches of one probe's pipeline calls.

    Args:
        pipe: the pipeline (``None`` when the denoiser is probed on its own: the pipeline that drives it is found
            from the call stack when it runs). denoiser: the probed denoiser module.
        passes: the probe's ``passes`` (``"cond"``, ``"uncond"`` or ``"all"``).
        prompts: ``probe(prompts=...)``: the texts of the conditional samples, or ``None``.
    """

    def __init__(self, pipe, denoiser, passes: str, prompts=None) -> None:
        self.pipe = pipe
        self.denoiser = denoiser
        self.family = family_of(denoiser)  # once: finding it walks the denoiser's modules
        self.passes = passes
        self.caller_prompts = as_texts(prompts)
        self.given: dict | None = None  # what the pipeline call in progress was given
        self._warned: set = set()  # (argument, its texts) warned about
        self.sample_key = None  # the first pipeline call's labels: every later call must have the same
        self.separate = False  # the unconditional pass runs as separate denoiser calls (Flux true CFG)
        self.found: dict[str, torch.Tensor] = {}  # what encode_prompt returned in the pipeline call in progress
        self.first_states = None  # encoder_hidden_states of the pipeline call's first denoiser call
        self.claims: dict[tuple, int] = {}  # (pass, prompt, image) -> its row in that call
        self.lost: set[int] = set()  # samples whose conditioning changed later in that call
        self.block_rows = 0  # rows per pass in that call's first denoiser call
        self.pass_states: dict = {}
        self.unknown_rows: list[int] = []  # rows of that call whose conditioning contradicts their position
        self.evidence = "none"  # how that call's labels were checked (BatchLabels.meta["row_evidence"])
        self._pipe_line: int | None = None  # the pipeline's current line when last looked up
        self.method: str | None = None  # a method of the pipeline other than __call__ running the denoiser
        self._cond_line: int | None = None  # its line at the first denoiser call of a pipeline call
        self.as_given = lambda value: value  # a prompt list as given, before encode_prompt rewrote it (EncodeWatch)
        self._set_streams()

    def _set_streams(self) -> None:
        """``streams``: ``(encoder, tokenizer)`` of each text encoder whose positions are the denoiser's text keys, in
        key order (the family's ``text_streams``), their pipeline attribute names, and the ids each encoded."""
        names = self.family.text_streams(self.pipe) if self.pipe is not None else []
        self.stream_names = [enc for enc, _ in names]
        self.streams = [(getattr(self.pipe, enc), _tokenizer(getattr(self.pipe, tok, None))) for enc, tok in names]
        self.encoded: list[list[torch.Tensor]] = [[] for _ in self.streams]
        self.tokenizer = self.streams[0][1] if self.streams else getattr(self.pipe, "tokenizer", None)

    # -------------------------------------------------------------- what the pipeline call was given
    def new_pipeline_call(self) -> None:
        """Forget the encodings and arguments of the previous pipeline call."""
        self.encoded = [[] for _ in self.streams]
        self.given = None
        self.found = {}

    def encoded_prompt(self, output) -> None:
        """The pipeline's ``encode_prompt`` returned ``output`` during the pipeline call in progress (its first
        ``encode_prompt`` is the conditioning; Flux's second one, of the negative prompt, is not used)."""
        if not self.found:
            self.found = encodings(output)

    def encoded_ids(self, stream: int, ids, given: dict) -> None:
        """Text encoder ``stream`` encoded ``ids`` during the pipeline call that was ``given`` these arguments."""
        if self.given is None:  # read the call's arguments before the pipeline overwrites them with embeddings
            self.given = given
        if isinstance(ids, torch.Tensor):  # PRX: [negative × n; prompt × n] in one encode, negative_prompt_embeds unused
            n = len(given.get("prompt") or ())
            split = self.family.batched_encode and ids.shape[0] == 2 * n > 0  # as prompt, then negative
            self.given = {**self.given, "negative_prompt_embeds": False} if split else self.given
            self.encoded[stream] += [part.detach().to("cpu") for part in ((ids[n:], ids[:n]) if split else (ids,))]

    def starts_pipeline_call(self, timestep: float, last_timestep: float, hw: tuple[int, int],
                             last_hw: tuple[int, int]) -> bool:
        """Whether a denoiser call at ``timestep`` on an ``hw`` latent starts a new pipeline call although no text
        encoder ran before it (the last call's were ``last_timestep`` and ``last_hw``).

        Schedulers count down: a timestep above the previous call's, a scheduler step index back at 0, or another
        latent size means a new pipeline call; another batch size alone does not (``callback_on_step_end`` may switch
        guidance off inside a call).
        """
        if timestep > last_timestep or hw != last_hw:
            return True
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is not None and isinstance(getattr(type(scheduler), "step_index", None), property):
            return scheduler.step_index in (None, 0)
        if timestep == last_timestep:  # one-step schedules repeat it across pipeline calls (PNDM within one)
            return (self.pipe_locals() or {}).get("i") == 0  # the pipeline's denoising loop starts again
        return False

    def mark_first_call(self) -> None:
        """The first denoiser call of a pipeline call is running: remember the pipeline's line (a conditional call,
        for pipelines that run the unconditional pass as separate calls)."""
        self._pipe_line = None
        self.pipe_locals()
        self._cond_line = self._pipe_line

    def _guidance_on(self, given: dict | None = None, batch: int = 0) -> bool:
        """Whether the batch holds both passes of classifier-free guidance (``[uncond × N, cond × N]``); ``False``
        for pipelines that run the unconditional pass as separate denoiser calls (Flux's true CFG). Without a
        ``do_classifier_free_guidance`` property, the call's ``guidance_scale`` decides, for batches that split in
        two (PixArt; not SLD's ``[uncond, cond, safety]``, which ``label`` labels from the pipeline's
        ``enable_safety_guidance``). A denoiser called directly (no pipeline call in progress) has no guidance, even
        after a guided pipeline call left its ``guidance_scale`` behind."""
        if self.pipe is None or (given or {}).get("separate_cfg") is not None:
            return False
        if not given and self.pipe_locals() is None:
            return False  # the denoiser called directly, outside any pipeline call: its rows are what it was given
        if (getattr(getattr(self.denoiser, "config", None), "guidance_embeds", False)
                and not isinstance(getattr(type(self.pipe), "do_classifier_free_guidance", None), property)):
            return False  # guidance-distilled (Flux.2 [dev]): its guidance_scale is an embedding, the batch one pass
        scale = (given or {}).get("guidance_scale") if batch % 2 == 0 else None  # PixArt: a local of __call__
        return bool(guidance_on(self.pipe, scale))

    def call_arguments(self) -> dict:
        """What the pipeline call in progress was given, read from its ``__call__`` frame (empty if not found):
        ``prompt`` and ``negative_prompt`` (lists of texts or None), whether ``prompt_embeds`` and
        ``negative_prompt_embeds`` were passed, and ``separate_cfg``: ``None`` for pipelines that batch the passes,
        else whether the unconditional pass runs as separate denoiser calls (Flux's ``do_true_cfg``), and
        ``safety_pass``: whether Safe Latent Diffusion adds a safety-concept pass (``enable_safety_guidance``)."""
        loc = self.pipe_locals()
        if loc is None:
            return {}
        for other in ("prompt_2", "prompt_3", "prompt_4"):
            texts = as_texts(loc.get(other))
            if texts is not None and texts != as_texts(loc.get("prompt")) and (other, *texts) not in self._warned:
                self._warned.add((other, *texts))  # once per text, however often the arguments are read
                warn(
                    f"{other} differs from prompt: each text stream's positions are labelled from the ids it encoded, "
                    "and concepts are looked up only in the streams that encoded prompt (SD3's T5 reads prompt_3, "
                    "HiDream's T5 prompt_3 and its Llama prompt_4): a concept of another prompt is not found",
                )
        true_cfg = "true_cfg_scale" in loc
        if true_cfg and "do_true_cfg" not in loc:  # read before the pipeline decided (during encode_prompt)
            negative = loc.get("negative_prompt") is not None or _embeds(loc, "negative_prompt_embeds") is not None
            loc = {**loc, "do_true_cfg": bool((loc.get("true_cfg_scale") or 0) > 1 and negative)}
        return {
            "prompt": as_texts(self.as_given(loc.get("prompt"))),
            "negative_prompt": as_texts(self.as_given(loc.get("negative_prompt"))),
            "prompt_embeds": _embeds(loc, "prompt_embeds") is not None,
            "negative_prompt_embeds": _embeds(loc, "negative_prompt_embeds") is not None,
            "separate_cfg": bool(loc["do_true_cfg"]) if true_cfg else None,
            "guidance_scale": loc.get("guidance_scale") if isinstance(loc.get("guidance_scale"), (int, float)) else None,
            "safety_pass": bool(loc.get("enable_safety_guidance")),  # SLD: [uncond, cond, safety concept] rows
        }

    def in_loop(self) -> bool:
        """Whether the pipeline call in progress is past the line of its first denoiser call (in its denoising
        loop: a ``callback_on_step_end``), rather than before its loop (a new pipeline call encoding its prompts)."""
        self.pipe_locals()
        return self._cond_line is not None and self._pipe_line is not None and self._pipe_line > self._cond_line

    def _separate_calls(self, loc: dict, states, batch: int) -> bool:
        """Whether a guided pipeline without ``true_cfg_scale`` runs its passes as separate denoiser calls (Wan, Chroma,
        CogView4, Lumina 2, HunyuanImage, LongCat): the first call's conditioning is ``__call__``'s ``prompt_embeds``,
        as many rows as ``negative_prompt_embeds`` (or it has one row per image and the negative one: broadcast)."""
        positive, negative = _embeds(loc, "prompt_embeds"), _embeds(loc, "negative_prompt_embeds")
        if not (isinstance(positive, torch.Tensor) and isinstance(negative, torch.Tensor)):
            return False
        n = (loc.get("batch_size"), loc.get("num_images_per_prompt") or 1)  # one row per image: negative broadcast
        images = n[0] * n[1] if all(type(v) is int for v in n) else 0
        return (states is positive and negative is not positive and positive.shape[0] == batch
                and negative.shape[0] in (batch, 1 if batch == images else batch)
                and (bool(guidance_on(self.pipe)) or guider_on(loc)))

    def uncond_call(self, states) -> bool:
        """Whether this denoiser call is a separate unconditional call (Flux true CFG, Wan, Chroma): the pipeline hands it its
        ``negative_prompt_embeds``. When those are the very tensor of ``prompt_embeds`` (a caller may pass one
        tensor for both), the call site tells: the pipeline makes the conditional call first, from its own line."""
        loc = self.pipe_locals()
        if not (loc and loc.get("do_true_cfg", True) and states is not None):
            return False
        negative, positive = _embeds(loc, "negative_prompt_embeds"), _embeds(loc, "prompt_embeds")
        if states is not positive or states is not negative:
            return states is negative
        return self._cond_line is not None and self._pipe_line != self._cond_line

    def pipe_locals(self) -> dict | None:
        """The locals of the pipeline's ``__call__`` frame in progress, or ``None`` (its current line in
        ``self._pipe_line``).

        Raises:
            ProbeError: another pipeline object that shares the probed denoiser is driving it (its rows would be
                labelled from the probed pipeline's arguments).
        """
        frame = inspect.currentframe()
        other = None
        self.method = None
        try:
            for _ in range(200):
                frame = frame.f_back if frame is not None else None
                if frame is None:
                    break
                if "self" not in frame.f_code.co_varnames:  # reading f_locals builds a dict: only where self is
                    continue
                me = frame.f_locals.get("self")
                owner = me if frame.f_code.co_name == "__call__" else None
                drives = owner is not None and any(
                    getattr(owner, a, None) is self.denoiser for a in DENOISER_ATTRS)
                if drives and self.pipe is None:
                    self.pipe = owner  # the denoiser was probed on its own, but a pipeline is driving it
                    self._set_streams()
                if owner is not None and owner is self.pipe:
                    self._pipe_line = frame.f_lineno
                    return frame.f_locals
                if me is not None and (me is self.pipe or (self.pipe is None and _pipeline(me) and any(
                        getattr(me, a, None) is self.denoiser for a in DENOISER_ATTRS))):
                    # outermost method of the pipeline seen, outside __call__ (a bare denoiser's: of one that owns it)
                    self.method = f"{type(me).__name__}.{frame.f_code.co_name}"
                if drives and other is None:
                    other = owner
        finally:
            del frame
        if other is not None:
            raise ProbeError(
                f"the probed denoiser is being run by another pipeline object ({type(other).__name__}) that shares it "
                f"with the probed one ({type(self.pipe).__name__}): its rows would be labelled from the wrong "
                "pipeline's arguments, so nothing of this call is recorded. Probe the pipeline you run: "
                "attnprobe.probe(that_pipeline)"
            )
        return None

    def _last_encodes(self, count: int) -> list:
        """Per text stream, the ids of the last of ``count`` encodes (``None`` where fewer were seen)."""
        return [list(encoded)[-1] if len(encoded) >= count else None for encoded in self.encoded]

    def _stream_ids(self, given: dict, negative: bool, extra: int = 0) -> tuple[list, list]:
        """Per text stream, the token ids of the prompt and of the negative prompt (``None`` where not encoded);
        ``extra``: encodes that follow them (SLD's safety concept)."""
        # diffusers encodes the prompt, then the negative prompt, skipping whichever came as embeddings
        # the last encodes are this call's (a failed call with the same arguments may have left its own before)
        expected = int(not given.get("prompt_embeds")) + int(bool(negative and not given.get("negative_prompt_embeds")))
        expected += extra
        conds, unconds = [], []
        for encoded in self.encoded:
            encoded = list(encoded)[-expected:] if expected else []
            encoded = encoded[: len(encoded) - extra] if extra else encoded
            conds.append(None if given.get("prompt_embeds") else (encoded.pop(0) if encoded else None))
            unconds.append(encoded.pop(0) if negative and encoded and not given.get("negative_prompt_embeds") else None)
        return conds, unconds

    def layout(self, text, ids_per_stream, prompt_index: int, n_keys: int, source: str) -> TokenLayout:
        """One sample's token layout (``layouts.stream_layout``)."""
        return stream_layout(self.family, self.pipe, list(zip(self.stream_names, self.streams)), self.tokenizer, text,
                             ids_per_stream, prompt_index, n_keys, source)

    def _check_rows(self, claims, states, per_prompt, cond_ids, uncond_ids, safety_ids) -> list[str]:
        """Each row's pass, checked against its conditioning: rows the evidence contradicts become ``"unknown"``
        (``self.unknown_rows``, with a warning); ``self.evidence`` says how the labels were checked."""
        ids = {}
        for text, per_stream in (("prompt", cond_ids), ("negative", uncond_ids), ("safety", safety_ids)):
            for prompt in {c[2] for c in claims if c[1] == text}:
                at = 0 if text == "safety" else prompt  # one safety concept, encoded once for every prompt
                rows = [i[at].tolist() if i is not None and i.shape[0] > at else None for i in per_stream]
                ids[(text, prompt)] = tuple(map(tuple, rows)) if rows and None not in rows else None
        found = verdicts(states, [c[1:] for c in claims], self.found, per_prompt, ids)
        labels = [c[0] if ok is not False else "unknown" for c, ok in zip(claims, found)]
        self.unknown_rows = [row for row, ok in enumerate(found) if ok is False]
        if self.unknown_rows:
            said = ", ".join(f"row {r}: {claims[r][0]} of prompt {claims[r][2]}" for r in self.unknown_rows[:4])
            warn(
                f"{type(self.pipe).__name__}'s denoiser batch is not what its recipe says: {said}"
                f"{' …' if len(self.unknown_rows) > 4 else ''} carry other conditioning (encoder_hidden_states) than "
                "that label's text. These rows are labelled 'unknown' (pass 'unknown', prompt_index -1): a hook or "
                "processor that reorders the batch, or a pipeline attnprobe does not know, did this",
            )
        self.evidence = ("contradicted" if self.unknown_rows else "encode_prompt" if all(found)
                         else "consistent" if isinstance(states, torch.Tensor) else "none")
        return labels

    def rows_in(self, batch: int, states, samples) -> tuple[tuple[str, ...], list[int | None]]:
        """A later denoiser call of the same pipeline call whose batch or conditioning changed (guidance switched
        off by ``callback_on_step_end``, ``prompt_embeds`` edited): each row's pass, and per sample of the store
        its row in this call, or ``None`` where it has none or its conditioning is no longer the first call's.

        Raises:
            ProbeError: the batch does not split into the blocks of the pipeline's passes.
        """
        given = self.given if self.given is not None else self.call_arguments()
        sld = bool(given.get("safety_pass"))
        cfg = self._guidance_on(given, batch)
        n_first = max((row for row in self.claims.values()), default=-1) + 1
        if cfg and not sld and batch == self.block_rows < n_first and self._conditional_only(states):
            cfg = False  # guidance cut inside the call while the property still says on (Z-Image's cfg_truncation)
        order = blocks(self.pipe, cfg or sld, sld)
        if batch % len(order) and cfg and not sld and batch == self.block_rows < n_first:
            raise ProbeError(
                f"the denoiser batch changed from {n_first} to {batch} rows inside one pipeline call while "
                f"{type(self.pipe).__name__} still says classifier-free guidance is on (guidance cut inside the call, "
                "as Z-Image's cfg_truncation does): its rows are not the first call's conditional rows, or an "
                "unconditional row had the same conditioning (a negative prompt equal to the prompt), so attnprobe "
                "cannot tell which pass they are"
            )
        if batch % len(order):
            raise ProbeError(
                f"the denoiser batch changed from {n_first} to {batch} rows inside one pipeline call, and {batch} rows "
                f"do not split into the blocks of {type(self.pipe).__name__}'s passes {[p for p, _ in order]} "
                f"(classifier-free guidance now {'on' if cfg else 'off'}): attnprobe cannot tell which row is which"
            )
        n = batch // len(order)
        if n != self.block_rows:  # images or prompts dropped: which ones remain, no conditioning tells
            self.lose([s.index for s in samples if s.index not in self.lost],
                      f"the denoiser batch changed from {self.block_rows} to {n} rows per pass inside the pipeline call")
            return tuple(order[row // n][0] for row in range(batch)), [None] * len(samples)
        per_prompt = max((key[2] for key in self.claims), default=0) + 1
        rows = [(p, prompt, image) for p, _, prompt, image in _claims(order, n, per_prompt)]
        labels = [p for p, _, _ in rows]
        where = {key: row for row, key in enumerate(rows)}
        present = [where.get((s.pass_label, s.prompt_index, s.image_index)) for s in samples]
        same = same_rows(states, self.first_states, [(r, s.row) if r is not None else None for s, r in zip(samples, present)])
        changed = [s.index for s, r, ok in zip(samples, present, same) if r is not None and not ok
                   and s.index not in self.lost]
        self.lose(changed, _CHANGED)
        mapped = [r if r is not None and ok and s.index not in self.lost else None
                  for s, r, ok in zip(samples, present, same)]
        return tuple(labels), mapped

    def _conditional_only(self, states) -> bool:
        """Whether a later call's batch of one block holds exactly the first call's conditional rows, in order, and
        no unconditional row had their conditioning (else images dropped from both blocks could look the same)."""
        cond = sorted((row, key) for key, row in self.claims.items() if key[0] == "cond")
        other = [row for key, row in self.claims.items() if key[0] != "cond"]
        if len(cond) != self.block_rows or not all(same_rows(states, self.first_states, list(enumerate(
                r for r, _ in cond)))):
            return False
        return not any(same_rows(self.first_states, self.first_states, [(u, r) for u in other for r, _ in cond]))

    def separate_rows(self, states, label: str, samples) -> list[int | None] | None:
        """A pipeline that runs its passes as separate denoiser calls: per store sample its row in this call of pass
        ``label``, ``None`` for samples whose conditioning is no longer that of the pass's first call (with a
        warning); ``None`` when nothing changed."""
        first = self.pass_states.setdefault(label, states)
        if states is first or label != self.passes:
            return None
        same = same_rows(states, first, [(s.row, s.row) for s in samples])
        self.lose([s.index for s, ok in zip(samples, same) if not ok], _CHANGED)
        return [None if s.index in self.lost else s.row for s in samples]

    def lose(self, samples: list[int], why: str) -> None:
        """Samples that no longer have a row attnprobe can name, from this denoiser call to the end of the pipeline
        call: their maps are NaN (``self.lost``), with a warning that says ``why`` (``{}``: the samples)."""
        samples = [i for i in samples if i not in self.lost]
        if not samples:
            return
        self.lost.update(samples)
        why = why.format(samples) if "{}" in why else f"{why} (samples {samples})"
        warn(f"{why}: attnprobe no longer knows which row or conditioning is theirs, so their maps are NaN from this "
             "denoiser call on")

    def label(self, batch: int, n_keys: int, hw: tuple[int, int], generation: int, states=None) -> BatchLabels:
        """The labels of a pipeline call's denoiser batch of ``batch`` rows and ``n_keys`` text keys on an ``hw``
        latent (the first denoiser call of pipeline call ``generation`` of the probe), whose conditioning is
        ``states`` (``encoder_hidden_states``). Each row's label comes from the pipeline's recipe (``passes.blocks``)
        and is checked against what the row was conditioned on (``evidence.verdicts``); a row the evidence
        contradicts is labelled ``"unknown"``, with a warning.

        Raises:
            ProbeError: the batch does not split into the passes the pipeline runs (an odd batch with guidance,
                skip-layer guidance); ``passes`` asks for a pass the call does not run, or for both passes of a
                pipeline that runs them as separate calls; ``probe(prompts=...)`` disagrees with what is encoded; the
                samples or size differ from the probe's first pipeline call.
        """
        given = self.given if self.given is not None else self.call_arguments()  # may find the driving pipeline
        loc = (self.pipe_locals() or {}) if self.pipe is not None else {}
        if given.get("separate_cfg") is None and self._separate_calls(loc, states, batch):
            given = {**given, "separate_cfg": True}
        separate = bool(given.get("separate_cfg"))
        cfg = self._guidance_on(given, batch)
        if self.pipe is not None:
            refuse(self.pipe, loc)
        if not loc and self.method is not None:
            raise ProbeError(
                f"{self.method} runs the denoiser outside the pipeline's __call__ (DiffEdit's invert and "
                "generate_mask do), with a batch attnprobe cannot label from the pipeline's recipe: it refuses rather "
                f"than label its rows wrongly. Open the probe around pipe(...) only, not around {self.method}(...)"
            )
        if separate and self.passes == "all":
            raise ProbeError(
                f"passes='all', but {type(self.pipe).__name__} runs the unconditional pass as separate denoiser calls "
                "(Flux and Qwen-Image with true_cfg_scale > 1 and a negative prompt; Chroma, Wan and others whenever "
                "guidance is on), so one store cannot hold both passes as rows of the same calls. Open two probes, one "
                "inside the other: probe(pipe, passes='cond') and probe(pipe, passes='uncond')."
            )
        sld = bool(given.get("safety_pass"))
        order = blocks(self.pipe, cfg or sld, sld) if not separate else (("cond", "prompt"),)
        if separate and self.passes == "uncond":
            order = (("uncond", "negative"),)  # the rows of the separate unconditional calls the store keeps
            negative = _embeds(loc, "negative_prompt_embeds")  # their text length may differ (Qwen-Image pads per prompt)
            if isinstance(negative, torch.Tensor) and negative.ndim == 3:
                glyphs = loc.get("negative_prompt_embeds_2")  # HunyuanImage's, HunyuanVideo 1.5's ByT5 keys after them
                n_keys = int(negative.shape[1]) + (int(glyphs.shape[1]) if isinstance(glyphs, torch.Tensor)
                                                   and glyphs.ndim == 3 else 0)
        if batch % len(order):
            raise ProbeError(
                f"{type(self.pipe).__name__}'s denoiser batch of {batch} rows does not split into the blocks of its "
                f"passes {[p for p, _ in order]} (classifier-free guidance {'on' if cfg else 'off'}): attnprobe "
                "cannot tell which row is which"
            )
        n = batch // len(order)
        labels = [p for p, _ in order for _ in range(n)]
        cond_ids, uncond_ids = self._stream_ids(given, cfg or separate or sld, extra=int(sld))
        safety_ids = self._last_encodes(1) if sld else []
        safety_text = getattr(self.pipe, "safety_concept", None) if sld else None
        zeros = bool(
            cfg and given and not given["negative_prompt_embeds"] and given["negative_prompt"] is None
            and getattr(getattr(self.pipe, "config", None), "force_zeros_for_empty_prompt", False)
        )
        frame_negative = given.get("negative_prompt")
        cond_texts = self.caller_prompts or given.get("prompt")
        if len(given.get("prompt") or ()) > 1 and any(len(enc) > 1 and all(e.shape[0] == 1 for e in enc)
                                                     for enc in self.encoded):
            raise ProbeError(
                f"{type(self.pipe).__name__} encodes each of its {len(given['prompt'])} prompts in a text-encoder call "
                "of its own (Bria does), and attnprobe cannot tell which encode was which prompt's: it refuses rather "
                "than label rows from another prompt's ids. Call it with one prompt at a time"
            )
        per_image = loc.get("num_images_per_prompt")
        per_image = per_image if isinstance(per_image, int) and per_image > 0 and n % per_image == 0 else 1
        n_prompts = (cond_ids[0].shape[0] if cond_ids and cond_ids[0] is not None else len(cond_texts) if cond_texts
                     else n // per_image)  # prompt_embeds passed: one row per prompt and image
        if self.caller_prompts is not None and cond_ids and cond_ids[0] is None and per_image * len(self.caller_prompts) != n:
            n_prompts = n // per_image  # the rows of prompt_embeds, num_images_per_prompt each
        if self.caller_prompts is not None and (len(self.caller_prompts) != n_prompts or n % n_prompts):
            raise ProbeError(
                f"probe(prompts=...) gave {len(self.caller_prompts)} texts, but this pipeline call encodes "
                f"{n_prompts} prompts ({n} conditional rows, {per_image} image(s) per prompt): give one text per prompt"
            )
        if cond_texts is not None and len(cond_texts) != n_prompts:
            cond_texts = None
        if n_prompts == 0 or n % n_prompts:
            n_prompts = n
            cond_texts, cond_ids = None, [None] * len(cond_ids)
        per_prompt = n // n_prompts
        neg_texts = frame_negative
        if any(i is not None for i in uncond_ids) and neg_texts is None:
            neg_texts = [""] * n_prompts  # diffusers encodes "" when no negative prompt is given
        if neg_texts is not None and len(neg_texts) == 1 and n_prompts > 1:
            neg_texts = neg_texts * n_prompts
        if neg_texts is not None and len(neg_texts) != n_prompts:
            neg_texts = None
        uncond_ids = [i if i is not None and i.shape[0] == n_prompts else None for i in uncond_ids]

        claims = _claims(order, n, per_prompt)
        # true CFG: this first call is a conditional one, whatever pass the store keeps; no batch to check
        labels = self._check_rows(claims, None if separate else states, per_prompt, cond_ids, uncond_ids, safety_ids)

        keep = [i for i, lab in enumerate(labels) if self.passes == "all" or lab == self.passes]
        if not keep and not (separate and self.passes == "uncond"):
            raise ProbeError(
                f"passes={self.passes!r} but this pipeline call has no {self.passes} pass: its batch of {batch} "
                f"rows is all {sorted(set(labels))} "
                + ("(rows whose conditioning contradicts their position are 'unknown'; passes='all' records them)."
                   if "unknown" in labels else
                   "(guidance ≤ 1 or a distilled model runs no unconditional pass). Use passes='cond' or 'all'.")
            )
        layouts: dict[tuple[str, int], TokenLayout] = {}
        samples, sample_layouts = [], []
        for row in keep:
            label, text_source, prompt_index, image_index = claims[row]
            if labels[row] == "unknown":  # its conditioning contradicts its position: nothing known of it
                samples.append(Sample(len(samples), "unknown", -1, self.unknown_rows.index(row), row, None))
                sample_layouts.append(unlabelled_layout(n_keys, source="contradicted"))
                continue
            if text_source == "safety":  # one safety concept for every prompt, encoded once
                if (text_source, 0) not in layouts:
                    ids = [i if i is not None and i.shape[0] == 1 else None for i in safety_ids]
                    layouts[(text_source, 0)] = self.layout(safety_text, ids, 0, n_keys, "prompt")
            elif (text_source, prompt_index) not in layouts:
                texts, ids = (cond_texts, cond_ids) if text_source == "prompt" else (neg_texts, uncond_ids)
                text = texts[prompt_index] if texts is not None else None
                source = "caller" if (text_source == "prompt" and self.caller_prompts) else "prompt"
                if text_source == "negative" and all(i is None for i in ids) and text is None:
                    layouts[(text_source, prompt_index)] = unlabelled_layout(n_keys, source="zeros" if zeros else "none")
                else:
                    layouts[(text_source, prompt_index)] = self.layout(text, ids, prompt_index, n_keys, source)
            lay = layouts[(text_source, 0 if text_source == "safety" else prompt_index)]
            samples.append(Sample(len(samples), label, prompt_index, image_index, row, lay.text))
            sample_layouts.append(lay)
        self.first_states, self.lost, self.block_rows = states, set(), n
        self.pass_states = {"cond": states}  # separate passes: each pass's first conditioning (the first is cond)
        self.claims = {(c[0], c[2], c[3]): row for row, c in enumerate(claims) if labels[row] != "unknown"}

        key = (tuple(labels), tuple((s.pass_label, s.prompt_index, s.image_index, s.text) for s in samples), hw, n_keys)
        if self.sample_key is not None and key != self.sample_key:
            raise SampleLayoutError(
                f"this probe holds generation 0 with samples {list(self.sample_key[1])} on a "
                f"{self.sample_key[2][0]}×{self.sample_key[2][1]} latent; pipeline call {generation} has "
                f"{list(key[1])} on {hw[0]}×{hw[1]}. One store holds one sample layout and size: open a new probe() "
                "for each pipeline call with other prompts, batch sizes or image sizes."
            )
        first = self.sample_key is None
        if first:
            self.sample_key = key
            self.separate = separate
        meta = dict(prompts=cond_texts, negative_prompts=neg_texts, num_images_per_prompt=per_prompt,
                    guidance=cfg or separate, separate_uncond_calls=separate, row_evidence=self.evidence)
        return BatchLabels(tuple(labels), keep, samples, sample_layouts, meta, first)
