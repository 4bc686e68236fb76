"""The main job: does a natural-language unlearning instruction lower the denoiser's attention to a concept?

    >>> from attnprobe.study import study
    >>> import tempfile
    >>> result = study(out=tempfile.mkdtemp(), concepts=["dog"], seeds=[0], steps=2, progress=False, echo=False)
    >>> sorted(p.name for p in result.files)
    ['auc.csv', 'delta_auc.png', 'failures.csv', 'heatmaps.png', 'presence.png', 'summary.csv', 'text_similarity.csv', 'text_similarity.png', 'trajectories.csv', 'trajectories.png']

For every concept × seed, one pipeline call generates every prompt variant from the *same* initial latents
(the seed's noise repeated), under a probe (conditional pass, head mean, fp16). From each sample's maps:

- ``mass``: the concept trajectory summed over every mention (``attnprobe.trajectory``);
- ``mass_last``: the last mention only, the one that asks for the picture, aligned with the baseline's single
  mention (``attnprobe.compare``'s ``align="last"``).

Per (concept, variant, seed): ``auc`` / ``auc_last`` (``attnprobe.auc``) and their Δ vs the baseline of the
same concept and seed; per (concept, variant): the mean Δ over seeds with a 95% t-interval. The question and
the prompts follow arXiv 2604.01514 ("Why Instruction-Based Unlearning Fails in Diffusion Models?").

Interventions (``attnprobe.interventions``) add rows beside the variants: each is one more pipeline call of the
baseline prompt from the same noise, with the intervention applied, measured the same way. A presence scorer
(``attnprobe.scorer``) scores every image for the concept, so that each row shows Δ attention next to Δ presence.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .analysis import auc, heatmap, trajectory
from .config import (
    STUDY_PARTS, check_capture, check_earlier_run, check_grid, check_models, check_out, is_study_folder, resolve_dtype,
)
from .editing import intervene
from .errors import ConceptError
from .interventions import parse_interventions
from .models import (  # noqa: F401  (load_pipeline and TINY_MODELS: re-exported, attnprobe.study's public names)
    OFFLINE_MODELS, TINY_MODELS, _check_model_name, _default_size, _denoiser, _first_line, _initial_latents, load_pipeline,
)
from .probe import probe
from .report import OUTPUT_FILES, done_line, format_summary, summarize, write_atomic, write_figures, write_tables
from .runner import FolderLock, Manifest, _slug, collect, grid, processes, settings_key, write_cell
from .scorer import PresenceScorer, checked_range, checked_scores, load_scorer, scorer_kind
from .text import similarity_rows
from .tokens import find_concept, token_layout
from .variants import (  # noqa: F401  (the concepts, variants and parse_variants: re-exported, public names here)
    DEFAULT_CONCEPTS, DEFAULT_VARIANTS, SHAPES_CONCEPTS, SHAPES_VARIANTS, model_defaults, parse_variants,
    shapes_concept_warnings,
)

__all__ = ["study", "StudyResult", "DEFAULT_CONCEPTS", "DEFAULT_VARIANTS", "SHAPES_CONCEPTS", "SHAPES_VARIANTS",
           "load_pipeline", "parse_variants"]


def _known_size(models) -> int | None:
    """The default image side when it is known before loading (the offline models), else None (native size)."""
    sizes = {_default_size(None, m) if m in OFFLINE_MODELS else None for m in models}
    return sizes.pop() if len(sizes) == 1 else None


def _check_other_models(models, concepts, variants) -> None:
    """Models after the first use its concepts, variants and scorer: say so, and check the shapes model's short
    prompts (16 tokens) before anything is generated."""
    if len(models) < 2:
        return
    if len({model_defaults(m)[2] for m in models}) > 1:
        _warn(f"concepts, variants and scorer not given follow the first model, {models[0]!r}, for every model")
    if "shapes" in models[1:]:
        from types import SimpleNamespace

        from .zoo.shapes_model import tokenizer

        try:
            _check_prompts(SimpleNamespace(tokenizer=tokenizer()), concepts, variants)
        except ValueError as exc:
            raise ValueError(f"model 'shapes' (16 tokens): {exc}; put 'shapes' first (its own concepts and "
                             "variants) or give --concepts and --variants that fit it") from None


@dataclass
class StudyResult:
    """What ``study`` wrote and computed (every row has a ``model`` key).

    Attributes:
        out: the output folder. files: every table and figure written.
        trajectories: tidy rows (model, concept, variant, seed, prompt, call, timestep, mass, mass_last).
        aucs: rows per (model, concept, variant, seed). summary: rows per (model, concept, variant).
        failures: rows per failed (model, concept, seed) cell or row: what failed and why (seed ``"text"``: the
            text analysis).
        text: text-encoder similarity rows (``attnprobe.text.similarity_rows``) per model, concept and variant.
        done: generations with results (this run's and earlier runs' in the same folder); skipped: those finished
            by an earlier run; partial: those done with a failed row or measure (their other rows are kept, the
            failure is in ``failures``, and running the study again redoes them); failed: generations that failed
            with nothing kept. In a process other than the main one of a multi-process run, only that process's
            counts (the main process merges the rows).
    """

    out: Path
    files: list[Path] = field(default_factory=list)
    trajectories: list[dict] = field(default_factory=list)
    aucs: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    text: list[dict] = field(default_factory=list)
    done: int = 0
    skipped: int = 0
    failed: int = 0
    partial: int = 0


def study(
    model: str | Sequence[str] = "tiny",
    out="attnprobe-study",
    concepts: Sequence[str] | None = None,
    variants=None,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 10,
    guidance: float = 7.5,
    size: int | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    echo: bool = True,
    interventions=None,
    scorer: str | PresenceScorer | None = "auto",
    capture: Mapping | None = None,
    restart: bool = False,
) -> StudyResult:
    """Concepts × prompt variants × seeds on one or more pipelines: concept-attention trajectories, AUC, Δ AUC, figures.

    Resumable and multi-process (``attnprobe.runner``): every finished generation is written to its own shard in
    ``out/cells/`` and recorded in a manifest, so a run started again on the same folder skips what finished (and
    redoes a damaged shard); launched by ``accelerate launch``, the processes split the grid and the main one
    merges every shard into the same tables and figures as one process. A study can be a TOML file
    (``attnprobe.load_config``).

    Args:
        model: ``"tiny"`` (default, offline), ``"tiny-xl"``, ``"tiny-sd3"``, ``"tiny-flux"``, ``"tiny-pixart"``,
            or a hub id / local folder of a diffusers text-to-image pipeline (UNet, SD3, Flux, PixArt); or a list of
            them (each a grid axis: tables get rows per model, figures go to ``out/figures/<model>/``).
        out: output folder (created). concepts: default ``DEFAULT_CONCEPTS`` (``SHAPES_CONCEPTS`` when the first
            model is ``"shapes"``).
        variants: names of ``DEFAULT_VARIANTS`` (``SHAPES_VARIANTS`` when the first model is ``"shapes"``) and/or
            ``name=template`` (see ``parse_variants``). Default: all.
        seeds: one generation per concept and seed (all variants share its initial noise). Default (0, 1, 2).
        steps: inference steps. guidance: classifier-free guidance scale. size: image side in pixels
            (default 64 for tiny models, the model's native size otherwise).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``… dtype: default fp16 on CUDA, fp32 on CPU.
        progress: show a progress bar. echo: print the summary table.
        interventions: rows of interventions beside the variants (``parse_interventions``: a spec such as
            ``"zero-attention,negative-prompt"`` or ``{label: config(s)}``), each applied to the baseline prompt
            in its own pipeline call from the same noise. Default: none.
        scorer: concept presence in each image: ``"auto"`` (default: ``"shapes"`` for the shapes model, else
            ``"tiny"``), ``"shapes"`` (the shapes model's programmatic checker, ``ShapesScorer``), ``"tiny"``
            (random-weight CLIP, plumbing only), a CLIP hub id / folder (``"openai/clip-vit-large-patch14"``), a
            ``PresenceScorer``, or ``"none"``.
        capture: the probe's settings: ``save`` (default ``False``; ``True`` streams every generation's maps to
            ``out/maps/<cell>/``, readable with ``AttentionStore.load``), ``heads`` (``"mean"``, default, or
            ``"keep"``), ``dtype`` (``"float16"``, default, ``"bfloat16"`` or ``"float32"``).
        restart: discard the finished generations of an earlier run in ``out`` instead of resuming. Default ``False``;
            resuming a folder whose study had other settings (steps, variants…) is refused.

    Writes to ``out``: ``trajectories.csv`` (per call), ``auc.csv`` (per seed), ``summary.csv`` (mean Δ AUC with
    95% interval), ``failures.csv`` (cells that failed; the study goes on), ``trajectories.png``,
    ``delta_auc.png``, ``heatmaps.png`` (first seed, each map min–max scaled, over the generated images),
    ``text_similarity.csv`` / ``text_similarity.png`` (``attnprobe.text``: the concept's text-encoder
    representation in each variant against the baseline, per layer), ``presence.png`` (Δ presence against
    Δ attention per row, with a scorer); and what a rerun resumes from: ``study.json`` (the settings), ``cells/``
    (one shard per finished generation), ``manifest/`` (the finished ones), ``failed/``, ``maps/`` (with
    ``capture={"save": True}``). See docs/scale.md.

    Raises:
        ModelLoadError: the model or the scorer cannot be loaded. ValueError: bad concepts/variants/seeds/steps, or an
            ``out`` that holds a study with other settings.
        InterventionError, ConceptError: an intervention that cannot run here (checked before generating).
    """
    models = check_models(model)
    _WARNED.clear()
    default_concepts, default_variants, default_scorer = model_defaults(models[0])
    variants = parse_variants(variants, default_variants)
    rows = parse_interventions(interventions)
    clash = sorted(set(rows) & set(variants))
    if clash:
        raise ValueError(f"intervention rows {clash} have the names of variants: label them (label=spec)")
    if len(variants) == 1 and not rows:
        _warn("only the baseline variant: every Δ is against itself; add a variant (--variants instruction) or an "
              "intervention row to compare")
    concepts = list(default_concepts if concepts is None else concepts)
    scorer = default_scorer if isinstance(scorer, str) and scorer == "auto" else scorer
    seeds = [int(s) for s in seeds]
    check_grid(concepts, seeds, steps, guidance, size)
    capture = check_capture(capture)
    procs = processes()
    device = _device(device, procs)
    dtype = resolve_dtype(dtype, device)
    out = check_out(out)
    for name in models:
        _check_model_name(name)
    scorer_name = scorer if isinstance(scorer, str) or scorer is None else getattr(scorer, "name", type(scorer).__name__)
    settings = dict(variants=variants, steps=int(steps), guidance=float(guidance),
                    size=size or _known_size(models),
                    dtype=str(dtype).replace("torch.", ""), scorer=scorer_name, capture=capture,
                    interventions={k: [repr(c) for c in v] for k, v in rows.items()})
    if restart:
        if out.is_dir() and any(out.iterdir()) and not is_study_folder(out):
            raise ValueError(f"--restart: {str(out)!r} holds files but no study (no study.json or manifest/); "
                             "nothing was deleted. Give the folder of a study, or a new one.")
    else:
        check_earlier_run(out, settings)
    scorer = scorer if isinstance(scorer, PresenceScorer) else load_scorer(scorer, device)
    checked_range(scorer)  # a malformed range stops the study before the first image
    if hasattr(scorer, "check_concepts"):
        scorer.check_concepts(concepts)  # a concept the scorer cannot read stops the study before the first image
    if "shapes" in models:
        for message in shapes_concept_warnings(concepts):
            _warn(message)
    _check_other_models(models, concepts, variants)
    pipe = _ready_pipeline(models[0], device, dtype, concepts, variants, rows, steps, guidance)
    plan = _Plan(out=out, procs=procs, settings=settings, models=models, concepts=concepts, seeds=seeds,
                 variants=variants, rows=rows, steps=steps, guidance=guidance, size=size, capture=capture, scorer=scorer,
                 device=device, dtype=dtype)
    # only now, when everything has been checked and loaded: a run that cannot start leaves the folder as it was
    if procs.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"out {str(out)!r} cannot be made a folder: {exc.strerror}") from None
    with FolderLock(out) if procs.is_main else contextlib.nullcontext():
        if procs.is_main:
            _start(plan, restart)
        procs.wait()
        return _run(plan, pipe, progress, echo)


@dataclass
class _Plan:
    """A checked study: what every process runs."""

    out: Path
    procs: object
    settings: dict
    models: list
    concepts: list
    seeds: list
    variants: dict
    rows: dict
    steps: int
    guidance: float
    size: int | None
    capture: dict
    scorer: object
    device: torch.device
    dtype: torch.dtype
    notes: set = field(default_factory=set)  # models already warned about (once per process)


def _start(plan: _Plan, restart: bool) -> None:
    """The main process, holding the folder's lock: clear an earlier run (``restart``), then write the settings."""
    from . import __version__

    out = plan.out
    if restart:
        for name in STUDY_PARTS:
            shutil.rmtree(out / name, ignore_errors=True) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    try:
        write_atomic(out / "study.json", json.dumps({"attnprobe": __version__, **plan.settings}, indent=1).encode())
    except OSError as exc:
        raise ValueError(f"out {str(out)!r} cannot be written to ({exc.strerror})") from None


def _run(plan: _Plan, pipe, progress: bool, echo: bool) -> StudyResult:
    """Every process: take a share of the pending cells, measure them, then the main process merges every shard."""
    from tqdm import tqdm

    out, procs, key = plan.out, plan.procs, settings_key(plan.settings)
    loaded = plan.models[0]
    cells = grid(plan.models, plan.concepts, plan.seeds)
    manifest = Manifest(out, procs.rank, settings=key, warn=_warn if procs.is_main else None)
    finished = manifest.finished(cells, warn=_warn if procs.is_main else None)
    procs.wait()  # no process writes its manifest before every process has read them all
    mine = procs.share([c for c in cells if c.id not in finished])
    skipped = sum(1 for c in cells if c.id in finished and c.kind == "generation")
    counts = {"done": 0, "failed": 0, "partial": 0}
    broken: dict[str, Exception] = {}
    where = f" [process {procs.rank + 1}/{procs.world}]" if procs.world > 1 else ""
    bar = tqdm(total=len(mine), desc=f"attnprobe study{where}", unit="cell", disable=not progress, file=sys.stderr,
               position=procs.rank)
    interrupted = False
    try:
        for cell in mine:
            bar.set_postfix_str(f"{cell.concept}, {'text' if cell.seed is None else f'seed {cell.seed}'}")
            failure = out / "failed" / f"{cell.id}.json"
            try:
                if cell.model in broken:  # a model that could not load: its cells fail at once, the others go on
                    raise broken[cell.model]
                if cell.model != loaded:
                    pipe = loaded = None  # one pipeline in memory at a time
                    try:
                        pipe = _ready_pipeline(cell.model, plan.device, plan.dtype, plan.concepts, plan.variants,
                                               plan.rows, plan.steps, plan.guidance)
                    except Exception as exc:
                        broken[cell.model] = exc
                        raise
                    loaded = cell.model
                record, tensors = _run_cell(pipe, cell, plan)
                manifest.record(cell, write_cell(out, cell, record, tensors, settings=key))
                failure.unlink(missing_ok=True)
                counts["done"] += cell.kind == "generation"
                counts["partial"] += bool(record["failures"])  # a row or measure failed: redone by the next run
            except Exception as exc:  # one failed cell must not lose the others
                counts["failed"] += cell.kind == "generation"
                seed = "text" if cell.seed is None else cell.seed
                try:
                    failure.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(failure, json.dumps(_failure(cell.model, cell.concept, seed, exc)).encode())
                except OSError:
                    pass  # the console line below still says it
                tqdm.write(f"attnprobe study: {cell.describe()} failed: {_first_line(exc)}", file=sys.stderr)
            bar.update()
    except KeyboardInterrupt:
        interrupted = True
        tqdm.write("attnprobe study: interrupted; what finished is kept (run again to resume)", file=sys.stderr)
    finally:
        bar.close()
    if procs.world > 1:
        line = done_line(counts["done"], skipped if procs.is_main else 0, counts["failed"], counts["partial"])
        print(f"attnprobe study{where}: {line}", file=sys.stderr)
        if interrupted:
            raise KeyboardInterrupt
        procs.wait()  # every process's cells are written: the main process merges them
    if not procs.is_main:
        return StudyResult(out=out, done=counts["done"], failed=counts["failed"], partial=counts["partial"])
    scorer_name = getattr(plan.scorer, "name", None)
    result = _merge(out, cells, plan.models, plan.concepts, plan.seeds, list(plan.variants) + list(plan.rows),
                    scorer_name=scorer_name, settings=key, presence_range=checked_range(plan.scorer))
    result.skipped = skipped
    if echo:
        shown = plan.size or (_default_size(pipe, plan.models[0]) if len(plan.models) == 1 and pipe else "native")
        print(format_summary(result, model=", ".join(plan.models), steps=plan.steps, guidance=plan.guidance,
                             size=shown, scorer=scorer_name, scorer_kind=scorer_kind(plan.scorer)))
    if interrupted:
        raise KeyboardInterrupt
    return result


def _device(device, procs) -> torch.device:
    """The device of this process: ``"auto"``: CUDA if available (under accelerate, the process's own GPU)."""
    if device == "auto":
        device = procs.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but this torch ({torch.__version__}) sees no CUDA device")
    if procs.world > 1 and procs.device is not None and device.type == procs.device.type and device != procs.device:
        if procs.is_main:
            _warn(f"device {str(device)!r} under {procs.world} processes: each process uses its own, "
                  f"{str(procs.device)!r} here")
        device = procs.device
    return device


def _ready_pipeline(model, device, dtype, concepts, variants, rows, steps, guidance):
    """Load a model and check that every prompt and intervention row applies to it, before it generates."""
    pipe = load_pipeline(model, str(device), dtype)
    _check_prompts(pipe, concepts, variants)
    for concept in concepts:  # every intervention row must apply here (concept, window, pipeline), before generating
        for items in rows.values():
            with intervene(pipe, items, variants["baseline"].format(c=concept), concept=concept) as run:
                run.check(steps, guidance)
    return pipe


def _merge(out: Path, cells, models, concepts, seeds, names, scorer_name=None, settings=None,
           presence_range=None) -> "StudyResult":
    """The study's outputs from every shard of the grid: the same files whichever processes measured the cells."""
    from types import SimpleNamespace

    result = StudyResult(out=out)
    figures = collect(out, cells, seeds, result, scorer_name, settings=settings)
    result.summary = summarize(result.aucs, result.text, models, concepts, names, presence_range)
    for name in OUTPUT_FILES:  # an old output that this run does not write again would mix with this one's
        (out / name).unlink(missing_ok=True)
    result.files = write_tables(result, out)
    shutil.rmtree(out / "figures", ignore_errors=True)  # figures of models no longer in the grid
    for model in models:
        folder = out if len(models) == 1 else out / "figures" / _slug(model)
        folder.mkdir(parents=True, exist_ok=True)
        mine = SimpleNamespace(summary=[r for r in result.summary if r["model"] == model],
                               text=[r for r in result.text if r["model"] == model])
        result.files += write_figures(mine, folder, figures[model])
    return result


#: The largest side of the images a cell shard keeps for the heat-map figure (pixels).
THUMBNAIL = 128


def _run_cell(pipe, cell, plan: "_Plan"):
    """One cell's record (every row with its ``model``) and tensors: a generation, or the text analysis."""
    if cell.kind == "text" and _denoiser(pipe) is not getattr(pipe, "unet", None):
        if cell.model not in plan.notes:
            plan.notes.add(cell.model)
            _warn(f"{cell.model}: text similarity skipped: attnprobe.text rebuilds the conditioning of UNet pipelines "
                  "(CLIP encoders) only, not of transformer pipelines (SD3: CLIP + T5, Flux: T5)")
        record, tensors = {"text": []}, {}
    elif cell.kind == "text":
        prompts = {v: t.format(c=cell.concept) for v, t in plan.variants.items()}
        record, tensors = {"text": similarity_rows(pipe, cell.concept, prompts)}, {}
    else:
        size = int(plan.size or _default_size(pipe, cell.model))
        maps = plan.out / "maps" / cell.id if plan.capture["save"] else None
        record, tensors = _measure_cell(pipe, cell.concept, cell.seed, plan.variants, plan.steps, plan.guidance, size,
                                        interventions=plan.rows, scorer=plan.scorer, capture=plan.capture, maps=maps)
    for key in ("trajectories", "aucs", "failures", "text"):
        record[key] = [{"model": cell.model, **r} for r in record.get(key, [])]
    return record, tensors


#: warnings already printed by the study in progress (a cell-level warning would repeat for every seed)
_WARNED: set[str] = set()


def _warn(message: str) -> None:
    """Print a study warning to stderr once per study (``study`` clears the record when it starts)."""
    from tqdm import tqdm

    if message in _WARNED:
        return
    _WARNED.add(message)
    tqdm.write(f"attnprobe study: warning: {message}", file=sys.stderr)


def _check_prompts(pipe, concepts, variants) -> None:
    """Every concept must be found (whole words) in every variant's prompt, before anything is generated."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None:
        return
    problems, cut = [], {}
    limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    for concept in concepts:
        for name, template in variants.items():
            prompt = template.format(c=concept)
            length = len(tokenizer(prompt).input_ids) if 0 < limit < 10**6 else 0
            try:
                find_concept(token_layout(tokenizer, prompt), concept, where=f"variant {name!r}")
            except ConceptError as exc:
                shown = concept if len(concept) <= 40 else concept[:39] + "…"
                if "maximum length" in str(exc):
                    problems.append(f"{shown!r} lies past the tokenizer's maximum length in variant {name!r}: "
                                    f"{prompt[:60]!r} is {length} tokens, the model reads {limit} (with start and "
                                    "end): shorten the template")
                else:
                    problems.append(f"{shown!r} is not in it as whole words in variant {name!r} ({prompt[:60]!r})")
                continue
            if length > limit:
                cut.setdefault(name, (prompt, length))
    if problems:
        raise ValueError("checking the prompts before generating: " + "; ".join(problems[:5]))
    for name, (prompt, length) in cut.items():
        _warn(f"variant {name!r} is {length} tokens ({prompt[:60]!r}…), the model reads {limit}: its end is cut off "
              "(the concept's requested mention is kept)")


def _failure(model: str, concept: str, seed, exc: BaseException, row: str = "") -> dict:
    return dict(model=model, concept=concept, seed=seed, error=(f"row {row}: " if row else "") + _first_line(exc),
                detail=traceback.format_exc(limit=3).replace("\n", " | "))


def _check_finite(mass: torch.Tensor, what: str) -> None:
    bad = (~torch.isfinite(mass)).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(f"non-finite attention for {what} from denoiser call {bad[0]} on (nan or inf latents)")


def _measure_cell(pipe, concept, seed, variants, steps, guidance, size, interventions=None, scorer=None,
                  capture=None, maps=None) -> tuple[dict, dict]:
    """One concept and seed: every variant in one pipeline call from the seed's noise, then one call of the baseline
    prompt per intervention row from the same noise, each under a probe; every image scored for presence.

    Returns the cell's record (``trajectories``, ``aucs`` and ``failures`` rows, ``rows``: the row names) and its
    tensors: ``map.<k>`` (heat map of row k, ``[H, W]``) and ``image.<k>`` (its image as uint8 RGB, at most
    ``THUMBNAIL`` pixels a side).
    With ``maps`` (a folder), every probe streams its store there (``AttentionStore.load`` reads it back).
    """
    capture = capture or check_capture(None)
    names = list(variants)
    prompts = [variants[v].format(c=concept) for v in names]
    latents = _initial_latents(pipe, seed, size, len(prompts), pipe.device, _denoiser(pipe).dtype)
    options = dict(num_inference_steps=int(steps), guidance_scale=float(guidance), height=size, width=size)
    if maps is not None:
        shutil.rmtree(maps, ignore_errors=True)  # a half-written earlier attempt of this cell

    def recording(p, row: str):
        return probe(p, passes="cond", heads=capture["heads"], dtype=getattr(torch, capture["dtype"]),
                     tokens=concept if capture["tokens"] == "concept" else None,
                     stream_to=None if maps is None else Path(maps) / row)

    with recording(pipe, "variants") as store:
        generated = pipe(prompts, latents=latents, **options)
    # per row: (name, store, sample, prompt, image, intervention, mass factors)
    runs = [(v, store, i, prompts[i], generated.images[i], "", None) for i, v in enumerate(names)]
    failures = []
    base = prompts[names.index("baseline")]
    for label, items in (interventions or {}).items():
        try:
            with intervene(pipe, items, base, concept=concept) as run:
                with recording(run.pipe, f"row-{_slug(label)}") as st:
                    out = run(latents=latents[:1], **options)
            factors = run.mass_factors(st, concept)
            _check_finite(_mass(st, concept, run.conditional_sample(st), "all", factors), f"row {label!r}")
        except Exception as exc:  # one failed row must not lose the cell's others
            failures.append(_failure("", concept, seed, exc, row=label))
            continue
        runs.append((label, st, run.conditional_sample(st), base, out.images[0],
                     " + ".join(n["intervention"] for n in run.notes), factors))
    presence, accuracy = _presence(scorer, [r[4] for r in runs], concept, seed, failures)
    rows, aucs, tensors = [], [], {}
    for k, ((variant, st, i, prompt, image, what, factors), p, a) in enumerate(zip(runs, presence, accuracy)):
        mentions = len(st.token_indices(i, concept))
        expected = variants.get(variant, variants["baseline"]).format(c="\0").count("\0")
        if mentions != expected:
            _warn(f"{concept!r} occurs {mentions} times in {prompt!r}, its template mentions it {expected} "
                  "times: the template's own words contain it, so 'last mention' may be one of them")
        mass, mass_last = (_mass(st, concept, i, occurrence, factors) for occurrence in ("all", -1))
        _check_finite(mass, f"variant {variant!r}")
        for call, (m, ml) in enumerate(zip(mass.tolist(), mass_last.tolist())):
            rows.append(dict(concept=concept, variant=variant, seed=seed, prompt=prompt, call=call,
                             timestep=st.calls[call].timestep, mass=m, mass_last=ml))
        aucs.append(dict(concept=concept, variant=variant, seed=seed, prompt=prompt, intervention=what,
                         mentions=mentions, auc=auc(mass), auc_last=auc(mass_last), presence=p, clip_accuracy=a))
        tensors[f"map.{k}"] = heatmap(st, concept, i, occurrence=-1).float()
        thumb = image.convert("RGB")
        thumb.thumbnail((THUMBNAIL, THUMBNAIL))  # for the heat-map figure: small, so every cell can keep its images
        tensors[f"image.{k}"] = torch.from_numpy(np.asarray(thumb, dtype=np.uint8).copy())
    base_row = next(r for r in aucs if r["variant"] == "baseline")
    for r in aucs:
        for key in ("auc", "auc_last", "presence", "clip_accuracy"):
            r[f"delta_{key}"] = r[key] - base_row[key]
    return dict(rows=[r[0] for r in runs], trajectories=rows, aucs=aucs, failures=failures), tensors


def _mass(store, concept, sample, occurrence, factors) -> torch.Tensor:
    """The concept trajectory ``[call]``; with ``renormalize=False`` edits, the weights the denoiser used."""
    if factors is None or bool((factors == 1).all()):
        return trajectory(store, concept, sample, occurrence=occurrence)
    return (trajectory(store, concept, sample, occurrence=occurrence, by_site=True) * factors).mean(dim=1)


def _presence(scorer, images, concept, seed, failures: list) -> tuple[list[float], list[float]]:
    """Per image, the scorer's presence score and CLIP accuracy: NaN without a scorer, without an ``accuracy``
    method, or where that method failed (its failure appended to ``failures``: the cell keeps its attention rows)."""
    nan = [float("nan")] * len(images)
    if scorer is None:
        return nan, nan
    found = {}
    for method in ("score", "accuracy"):
        if not callable(getattr(scorer, method, None)):
            continue
        try:
            found[method] = checked_scores(scorer, method, images, concept)
        except Exception as exc:  # one failed measure loses only itself
            failures.append(_failure("", concept, seed, exc, row="presence" if method == "score" else method))
    return found.get("score", nan), found.get("accuracy", nan)


