"""``probe()``: record every cross-attention map of a diffusers pipeline while it generates as usual (the entry point;
the ``Recorder`` it opens does the work, ``attnprobe.capture.recorder``).

    >>> import attnprobe
    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with attnprobe.probe(pipe, heads="mean") as store:
    ...     _ = pipe("a picture of a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
    >>> len(store.calls), tuple(store[store.sites[0].name].shape)
    (2, (2, 1, 1, 8, 8, 77))
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
from typing import Iterator, Sequence

import torch

from ..errors import ProbeError, warn
from ..store import AttentionStore
from ..store.files import json_safe
from .families import checked_family, family_of
from .options import check_options
from .experts import ExpertsRecorder, experts_of
from .recorder import Recorder
from .relations import check_relations
from .selection import call_filter, check_tokens
from .sites import SiteSelector, denoiser_of, list_sites, select_sites

__all__ = ["probe"]


class _OneBlock:
    """A probe's context manager, which records one ``with`` block: entering it again (after its block, or inside
    it) raises a ``ProbeError`` saying so, where a generator's context manager fails inside ``contextlib``."""

    def __init__(self, manager) -> None:
        self._manager, self._entered, self._store, self._pid = manager, False, None, None

    def __enter__(self) -> AttentionStore:
        if self._entered:
            raise ProbeError("this attnprobe.probe(...) was already entered: a probe records one `with` block and "
                             "gives one store; call attnprobe.probe(pipe, ...) again for each block")
        self._entered = True
        self._store, self._pid = self._manager.__enter__(), os.getpid()
        _OPEN.add(self)  # held here: `store = probe(pipe).__enter__()` keeps recording until its exit
        return self._store

    def __exit__(self, *exc) -> bool:
        _OPEN.discard(self)
        return self._manager.__exit__(*exc)


#: probes entered and not yet exited
_OPEN: "set[_OneBlock]" = set()


@atexit.register
def _close_open_probes() -> None:
    """Close, as an interrupted block, every probe still open when the interpreter exits: left to the interpreter's
    teardown, its generator runs torch after torch has begun to clean up, and the process aborts in C++. Every probe
    is closed before anything is said (warnings turned into errors cannot stop it). A forked child closes its copies
    without a word (and without writing: ``probe`` finishes a store in its own process only)."""
    blocks = list(_OPEN)
    mine = [block for block in blocks if block._pid == os.getpid()]
    told = {}
    for k, block in enumerate(mine):  # numbered: the default filter shows a repeated text once
        where = f"streamed to {block._store.folder}" if block._store.folder else "in memory"
        told[block] = (f"a probe (attnprobe.probe(...), or the one concept_attention(...) opens; "
                       f"{len(block._store.calls)} call(s), {where}{f'; {k + 1} of {len(mine)}' if len(mine) > 1 else ''})")
    failed = {}
    for block in blocks:
        try:
            block.__exit__(GeneratorExit, GeneratorExit(), None)
        except Exception as error:  # noqa: BLE001 - one probe's failure must not keep the others open
            failed[block] = error
    for block, what in told.items():
        error = failed.get(block)
        _say(f"{what} was entered and never exited: " + (
            f"closing it at interpreter exit failed: {type(error).__name__}: {error}" if error else
            "closed at interpreter exit as an interrupted block (its whole calls kept, the processors restored)"))


def _say(message: str) -> None:
    """A warning, or a line on stderr where warnings are errors (at exit, nobody could catch one)."""
    try:
        warn(message)
    except Exception:  # noqa: BLE001
        print(f"attnprobe: {message}", file=sys.stderr)


def _one_block(function):
    manager = contextlib.contextmanager(function)

    @functools.wraps(function)
    def make(*args, **kwargs) -> _OneBlock:
        return _OneBlock(manager(*args, **kwargs))

    return make


@_one_block
def probe(
    pipe,
    sites: SiteSelector = None,
    passes: str = "cond",
    heads: str = "keep",
    dtype: torch.dtype = torch.float16,
    device="cpu",
    prompts: Sequence[str] | None = None,
    calls=None,
    tokens=None,
    aggregate: str | None = None,
    stream_to=None,
    joint: str = "exact",
    allow_generic: bool = False,
    relations=None,
    points=None,
) -> Iterator[AttentionStore]:
    """Record the cross-attention probabilities of every denoiser call while the pipeline runs as usual.

    The pipeline's outputs are unchanged (bit-identical): the installed processors still compute every
    output; the probe only reads q and k and computes ``softmax(q·kᵀ·scale + mask)`` beside them, in fp32.
    For joint attention (SD3, Flux) the map is the image-query × text-key block of the softmax over image and
    text keys (``joint``; see ``attnprobe.joint``).

    Args:
        pipe: a diffusers pipeline (SD 1.x/2.x, SDXL and other UNet pipelines; SD3, Flux, PixArt-α) or its
            denoiser module.
        sites: which sites: ``None`` (all cross-attention sites), a name, a glob (``"up_blocks.*"``), a list of
            them, or a predicate ``Site -> bool``. Default: ``None``.
        passes: ``"cond"`` (conditional rows only), ``"uncond"`` (unconditional rows of classifier-free
            guidance only) or ``"all"``. Default: ``"cond"``.
        heads: ``"keep"`` (every head) or ``"mean"`` (mean over heads; head axis of length 1). Default ``"keep"``.
        dtype: dtype the maps are kept in: ``torch.float16``, ``bfloat16``, ``float32`` or ``float64``. Default:
            ``torch.float16``.
        device: where the maps are kept (``"cpu"`` or a GPU). Default: ``"cpu"``.
        prompts: texts that label the conditional samples when the pipeline is called with ``prompt_embeds``
            (no text-encoder call to observe). Default: ``None``.
        calls: which denoiser calls to record, counted from 0 in each pipeline call (Flux true CFG's separate
            unconditional calls count too): an int, a list or ``range``
            of ints, a ``slice``, or a predicate ``(index, timestep) -> bool`` (``lambda i, t: t > 500``). The
            others run untouched, at no cost. ``Call.index`` keeps the true call count. Default: ``None`` (all).
        tokens: which text-token positions to keep: a concept (``"dog"``), a list of concepts (every position of
            every occurrence in any sample of the call), or a list of prompt positions. The ``token`` axis then
            holds ``store.token_positions`` only, and values hold their share of the full softmax (they do not sum
            to 1); ``store.tokens`` and ``token_indices`` follow. Default: ``None`` (all).
        aggregate: ``"sum"`` or ``"mean"``: keep one running fp32 aggregate over the recorded calls instead of a
            map per call (for heat maps; memory of one call). The ``call`` axis then has length 1;
            ``store.calls`` lists the calls it holds. Default: ``None`` (a map per call).
        stream_to: a new or empty folder: every recorded call is written there as it finishes (one safetensors
            shard per call, token-major; see ``attnprobe.shards``) and freed, so memory stays flat over long
            runs. The yielded store reads its maps from that folder; ``AttentionStore.load(folder)`` reopens it,
            also after a crash (every finished call is kept). Default: ``None`` (in memory).
        joint: the map of joint-attention sites (``Site.kind`` ``"joint"`` or ``"single"``): ``"exact"``, the
            image-query × text-key block of the full softmax over ``[image; text]`` keys (a row sums to that image
            position's text share, in [0, 1]; computed in chunks of image queries, never the whole ``N × (N + T)``
            matrix), or ``"renorm"``, the softmax over the text keys only (rows sum to 1). Cross-attention sites
            ignore it. With ``"exact"`` the mean text share per call, sample and head is kept too
            (``store.text_share(site)``). Default: ``"exact"``.
        allow_generic: record a denoiser that no family covers (docs/pipelines.md) from its structure alone, with a
            warning that its labels are unchecked. Default: ``False`` (refused).
        relations: other blocks of the probed sites' attention, kept beside the maps in ``store.relations``:
            ``"image->image"`` (with ``points``), ``"text->image"``, ``"text->text"`` (joint-attention sites), or a
            list of them; for UNet, PixArt, SD3, Flux, Qwen-Image, Flux.2 and CogView4 (``attnprobe.capture.relations``). Default: ``None``.
        points: the image positions ``(y, x)`` whose attention to every image position ``"image->image"`` keeps,
            fractions of the image's height and width in [0, 1]. Default: ``None``.

    Yields:
        An ``AttentionStore``, filled while the block runs: ``store[site]`` is ``[call, sample, head, qh, qw, token]``
        (a video denoiser's, Wan 2.1, CogVideoX: ``[call, sample, head, qt, qh, qw, token]``, docs/video.md),
        summing to 1 over ``token`` (to the text share for ``exact`` joint sites).

    Raises:
        ProbeError: bad options; a refused denoiser (video, audio, a prior) or one no family covers (without
            ``allow_generic``), before the pipeline runs; a processor was replaced during the run (attention slicing, fused QKV,
            xformers…); a site did not run; ``passes="uncond"`` with no unconditional pass; ``passes="all"`` when
            the unconditional pass runs as separate denoiser calls (Flux true CFG: open a ``"cond"`` and an
            ``"uncond"`` probe); an attention mask at a joint site; no denoiser call (or ``calls`` kept none). ConceptError: a ``tokens`` concept in none of the prompts. StoreError:
            ``stream_to`` is a file or a folder that is not empty; StoreIOError if a shard cannot be written (full disk).
            ProbeError, too, for a video store whose estimated size is over the free memory (or disk), before its first call;
            for ``relations`` outside ``relations.FAMILIES``, with ``aggregate``/``stream_to``, or over the free memory;
            and when the object ``probe(...)`` returned is entered a second time (one ``with`` block per probe).
        NoSitesError, UnknownSiteError: see ``list_sites`` / ``select_sites``.

    Examples:
        >>> import attnprobe, torch
        >>> from attnprobe.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> with attnprobe.probe(pipe, sites="mid_block.*", passes="all") as store:
        ...     _ = pipe(["a dog", "a cat"], num_inference_steps=1, height=64, width=64, output_type="latent")
        >>> [(s.pass_label, s.prompt_index) for s in store.samples]
        [('uncond', 0), ('uncond', 1), ('cond', 0), ('cond', 1)]
    """
    check_options(passes, heads, dtype, device, prompts, joint, aggregate, stream_to, relations)
    call_filter(calls), check_tokens(tokens)  # bad selections fail here, before the pipeline runs
    relations, points = check_relations(relations, points)
    denoiser = denoiser_of(pipe)
    every = list_sites(denoiser) if family_of(denoiser).refused is None else []  # no text attention at all says
    checked_family(pipe, denoiser, allow_generic)  # more than "no family"; a refused family's reason, more still
    chosen = select_sites(every, sites)
    experts = experts_of(pipe, denoiser)  # Wan 2.2: both experts, one store
    args = (pipe, denoiser, chosen, passes, heads, dtype, device, prompts, every, calls, tokens, aggregate, stream_to,
            joint, relations, points)
    recorder = ExpertsRecorder(experts, *args) if experts else Recorder(*args)
    if prompts is not None and recorder.rows.tokenizer is None:
        raise ProbeError(
            f"prompts= needs a tokenizer to label positions, and {type(pipe).__name__} has none: pass the pipeline "
            "(its tokenizer is used), not its denoiser"
        )
    recorder.install()
    owner = os.getpid()
    try:
        try:
            yield recorder.store
        except BaseException:
            if os.getpid() == owner:  # a forked child's copy, closed at its exit, must not rewrite the store's files
                recorder.finish(complete=False)  # keep whole calls only; the error that ended the block goes on
            raise
        if os.getpid() == owner:
            recorder.finish(complete=True)
        else:
            warn(f"this probe was opened in process {owner}: its block, left in a forked child (process "
                 f"{os.getpid()}), leaves the store to that process (nothing of the child's is written or checked)")
    finally:
        recorder.remove()
        recorder.store.meta = json_safe(recorder.store.meta)
