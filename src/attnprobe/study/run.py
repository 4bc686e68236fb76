"""The main job: does a natural-language unlearning instruction lower the denoiser's attention to a concept?

    >>> from attnprobe.study import study
    >>> import tempfile
    >>> result = study(out=tempfile.mkdtemp(), concepts=["dog"], seeds=[0], steps=2, progress=False, echo=False)
    >>> sorted(p.name for p in result.files)
    ['auc.csv', 'contrasts.csv', 'contrasts.png', 'delta_auc.png', 'failures.csv', 'heatmaps.png', 'presence.png', 'report.html', 'summary.csv', 'text_similarity.csv', 'text_similarity.png', 'trajectories.csv', 'trajectories.png', 'where_when.csv', 'where_when.png']

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
(``attnprobe.study.scorer``) scores every image for the concept, so that each row shows Δ attention next to Δ presence.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .._version import __version__
from .._atomic import write_atomic
from ..capture import checked_family, denoiser_of, family_of
from ..capture.encoders import pipeline_encoding
from ..errors import AttnprobeError, ConceptError, ConfigError, StoreIOError
from ..interventions import intervene, parse_interventions
from ..models.loader import OFFLINE_MODELS, TINY_MODELS, check_model_name, first_line, load_pipeline
from ..models.shapes.model import tokenizer as shapes_tokenizer
from ..text import similarity_rows, text_unsupported
from . import measure
from .video import check_frames, is_video
from .cells import Manifest, collect, grid, settings_key, shard_path, slug, write_cell
from .config import (
    STUDY_PARTS, check_capture, check_earlier_run, check_grid, check_models, check_out, is_study_folder, resolve_dtype,
)
from .files import FATAL_ERRNOS, Staged, remove_temporaries, remove_unlisted, writing
from .lock import FolderLock
from .page import write_page
from .processes import processes
from .contrasts import contrast_rows, where_when_rows
from .report import (
    OUTPUT_FILES, WARNED, done_line, format_summary, interval, summarize, warn, write_figures, write_tables,
)
from .scorer import PresenceScorer, checked_range, load_scorer, scorer_kind
from .variants import (
    DEFAULT_CONCEPTS, DEFAULT_VARIANTS, SHAPES_CONCEPTS, SHAPES_VARIANTS, model_defaults, parse_variants,
    shapes_concept_warnings,
)

__all__ = ["study", "StudyResult", "DEFAULT_CONCEPTS", "DEFAULT_VARIANTS", "SHAPES_CONCEPTS", "SHAPES_VARIANTS",
           "load_pipeline", "parse_variants"]


def _known_size(models) -> int | None:
    """The default image side when it is known before loading (the offline models), else None (native size)."""
    sizes = {measure.default_size(None, m) if m in OFFLINE_MODELS else None for m in models}
    return sizes.pop() if len(sizes) == 1 else None


def _check_other_models(models, concepts, variants) -> None:
    """Models after the first use its concepts, variants and scorer: say so, and check the shapes model's short
    prompts (16 tokens) before anything is generated."""
    if len(models) < 2:
        return
    if len({model_defaults(m)[2] for m in models}) > 1:
        warn(f"concepts, variants and scorer not given follow the first model, {models[0]!r}, for every model")
    if "shapes" in models[1:]:
        from types import SimpleNamespace

        try:
            measure.check_prompts(SimpleNamespace(tokenizer=shapes_tokenizer()), concepts, variants)
        except ConfigError as exc:
            raise ConfigError(f"model 'shapes' (16 tokens): {exc}; put 'shapes' first (its own concepts and "
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
        contrasts: paired differences between rows per model, measure, contrast and concept
            (``attnprobe.study.contrasts.contrast_rows``); where_when: Δ attention on the requested mention per model,
            concept, row, site and denoiser call (``where_when_rows``).
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
    contrasts: list[dict] = field(default_factory=list)
    where_when: list[dict] = field(default_factory=list)
    where_when_data: dict = field(default_factory=dict, repr=False)
    browser: list = field(default_factory=list, repr=False)  # report.html's heat-map data per generation (collect)
    videos: dict = field(default_factory=dict)  # per video model, its cells' frame record (video.frame_record)
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
    frames: int | None = None,
) -> StudyResult:
    """Concepts × prompt variants × seeds on one or more pipelines: concept-attention trajectories, AUC, Δ AUC, figures.

    Resumable and multi-process (``attnprobe.runner``): every finished generation is written to its own shard in
    ``out/cells/`` and recorded in a manifest, so a run started again on the same folder skips what finished (and
    redoes a damaged shard); launched by ``accelerate launch``, the processes split the grid and the main one
    merges every shard into the same tables and figures as one process. A study can be a TOML file
    (``attnprobe.load_config``).

    Args:
        model: ``"tiny"`` (default, offline), ``"tiny-xl"``, ``"tiny-sd3"``, ``"tiny-flux"``, ``"tiny-pixart"``,
            ``"tiny-wan"`` (a video model: see ``frames``), any ``"tiny-<name>"``, or a hub id / local folder of a
            diffusers text-to-image or text-to-video pipeline attnprobe records; or a list of them (each a grid axis: tables get rows per model, figures go to ``out/figures/<model>/``).
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
        frames: a video model's decoded frames per video (``num_frames``), ``k · c + 1`` for its temporal compression
            ``c``. Default ``None``: 3 latent frames (9 frames for Wan, SkyReels-V2 and CogVideoX). Refused for an
            image model. See ``attnprobe.study.video`` (the still of a video is its middle decoded frame).

    Writes to ``out``: ``trajectories.csv`` (per call), ``auc.csv`` (per seed), ``summary.csv`` (mean Δ AUC with
    95% interval), ``failures.csv`` (cells that failed; the study goes on), ``trajectories.png``,
    ``delta_auc.png``, ``heatmaps.png`` (first seed, each map min–max scaled, over the generated images),
    ``text_similarity.csv`` / ``text_similarity.png`` (``attnprobe.text``: the concept's text-encoder
    representation in each variant against the baseline, per layer), ``presence.png`` (Δ presence against
    Δ attention per row, with a scorer); and what a rerun resumes from: ``study.json`` (the settings), ``cells/``
    (one shard per finished generation), ``manifest/`` (the finished ones), ``failed/``, ``maps/`` (with
    ``capture={"save": True}``). See docs/scale.md.

    Raises:
        ModelLoadError: the model or the scorer cannot be loaded. ConfigError (a ValueError): bad concepts/variants/
            seeds; steps outside 1 … 1000; a size (pixels) over 4096, not a multiple of the model's factor or whose
            decoding would not fit the device's memory (``measure.check_size``); an ``out`` that holds a study with
            other settings or that another run holds (``FolderLock``).
        StoreIOError (a StoreError and an OSError): a file of ``out`` cannot be written (full disk, read-only folder,
            missing directory, no permission); the message names it and the cause. What was written before is kept,
            the previous merge's tables and figures included (``files.Staged``).
        InterventionError, ConceptError: an intervention that cannot run here (checked before generating).
        ConfigError: ``frames`` for an image model, or a count the video model's temporal compression cannot make.
    """
    models = check_models(model)
    WARNED.clear()
    default_concepts, default_variants, default_scorer = model_defaults(models[0])
    variants = parse_variants(variants, default_variants)
    rows = parse_interventions(interventions)
    clash = sorted(set(rows) & set(variants))
    if clash:
        raise ConfigError(f"intervention rows {clash} have the names of variants: label them (label=spec)")
    if len(variants) == 1 and not rows:
        warn("only the baseline variant: every Δ is against itself; add a variant (--variants instruction) or an "
              "intervention row to compare")
    concepts = list(default_concepts if concepts is None else concepts)
    scorer = default_scorer if isinstance(scorer, str) and scorer == "auto" else scorer
    check_grid(concepts, list(seeds), steps, guidance, size)
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ConfigError(f"frames must be a whole number ≥ 1 (decoded frames per video); got {frames!r}")
    seeds = [int(s) for s in seeds]
    capture = check_capture(capture)
    procs = processes()
    device = _device(device, procs)
    dtype = resolve_dtype(dtype, device)
    out = check_out(out)
    for name in models:
        check_model_name(name)
    scorer_name = scorer if isinstance(scorer, str) or scorer is None else getattr(scorer, "name", type(scorer).__name__)
    settings = dict(variants=variants, steps=int(steps), guidance=float(guidance),
                    size=size or _known_size(models),
                    dtype=str(dtype).replace("torch.", ""), scorer=scorer_name, capture=capture,
                    interventions={k: [repr(c) for c in v] for k, v in rows.items()})
    if frames is not None:  # only when given: the settings (and the key of every finished cell) of image studies stay
        settings["frames"] = int(frames)
    if restart:
        if out.is_dir() and any(out.iterdir()) and not is_study_folder(out):
            raise ConfigError(f"--restart: {str(out)!r} holds files but no study (no study.json or manifest/); "
                             "nothing was deleted. Give the folder of a study, or a new one.")
    else:
        check_earlier_run(out, settings)
    scorer = scorer if isinstance(scorer, PresenceScorer) else load_scorer(scorer, device)
    checked_range(scorer)  # a malformed range stops the study before the first image
    if hasattr(scorer, "check_concepts"):
        scorer.check_concepts(concepts)  # a concept the scorer cannot read stops the study before the first image
    if "shapes" in models:
        for message in shapes_concept_warnings(concepts):
            warn(message)
    _check_other_models(models, concepts, variants)
    pipe = _ready_pipeline(models[0], device, dtype, concepts, variants, rows, steps, guidance, size, frames)
    plan = _Plan(out=out, procs=procs, settings=settings, models=models, concepts=concepts, seeds=seeds,
                 variants=variants, rows=rows, steps=steps, guidance=guidance, size=size, capture=capture, scorer=scorer,
                 device=device, dtype=dtype, frames=frames)
    # only now, when everything has been checked and loaded: a run that cannot start leaves the folder as it was
    if procs.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"out {str(out)!r} cannot be made a folder: {exc.strerror}") from None
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
    frames: int | None = None
    notes: set = field(default_factory=set)  # models already warned about (once per process)


def _start(plan: _Plan, restart: bool) -> None:
    """The main process, holding the folder's lock: clear an earlier run (``restart``), then write the settings."""
    out = plan.out
    remove_temporaries(out, STUDY_PARTS[1:])  # left by killed runs: no live run writes here while we hold the lock
    if restart:
        for name in STUDY_PARTS:
            with contextlib.suppress(OSError):
                shutil.rmtree(out / name, ignore_errors=True) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    try:
        write_atomic(out / "study.json", json.dumps({"attnprobe": __version__, **plan.settings}, indent=1).encode())
    except OSError as exc:
        raise ConfigError(f"out {str(out)!r} cannot be written to ({exc.strerror})") from None


#: set while a study merges what finished: the command's SIGTERM lets the merge end first (study.cli)
MERGING = threading.Event()

#: What a run stopped by its folder says it kept.
_RESUME = "every generation finished before is kept: run the same command again to resume"


def _run(plan: _Plan, pipe, progress: bool, echo: bool) -> StudyResult:
    """Every process: take a share of the pending cells, measure them, then the main process merges every shard."""
    from tqdm import tqdm

    out, procs, key = plan.out, plan.procs, settings_key(plan.settings)
    loaded = plan.models[0]
    cells = grid(plan.models, plan.concepts, plan.seeds)
    manifest = Manifest(out, procs.rank, settings=key, warn=warn if procs.is_main else None)
    finished = manifest.finished(cells, warn=warn if procs.is_main else None)
    procs.wait()  # no process writes its manifest before every process has read them all
    mine = procs.share([c for c in cells if c.id not in finished])
    skipped = sum(1 for c in cells if c.id in finished and c.kind == "generation")
    counts = {"done": 0, "failed": 0, "partial": 0}
    broken: dict[str, Exception] = {}
    where = f" [process {procs.rank + 1}/{procs.world}]" if procs.world > 1 else ""
    bar = tqdm(total=len(mine), desc=f"attnprobe study{where}", unit="cell", disable=not progress, file=sys.stderr,
               position=procs.rank)
    interrupted: KeyboardInterrupt | None = None  # raised again once what finished is merged
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
                                               plan.rows, plan.steps, plan.guidance, plan.size, plan.frames)
                    except Exception as exc:
                        broken[cell.model] = exc
                        raise
                    loaded = cell.model
                record, tensors = _run_cell(pipe, cell, plan)
                with writing(shard_path(out, cell), then=_RESUME):
                    entry = write_cell(out, cell, record, tensors, settings=key)
                with writing(manifest.own, then=_RESUME):
                    manifest.record(cell, entry)
                with contextlib.suppress(OSError):
                    failure.unlink(missing_ok=True)
                counts["done"] += cell.kind == "generation"
                counts["partial"] += bool(record["failures"])  # a row or measure failed: redone by the next run
            except StoreIOError:
                raise  # the folder cannot take this cell's results: no other cell's could be kept either
            except Exception as exc:  # one failed cell must not lose the others
                if isinstance(exc, OSError) and exc.errno in FATAL_ERRNOS:  # a full disk, a read-only file system
                    raise StoreIOError.of(exc, exc.filename or out, "cannot be written", _RESUME) from None
                counts["failed"] += cell.kind == "generation"
                seed = "text" if cell.seed is None else cell.seed
                try:
                    failure.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(failure, json.dumps(measure.failure_row(cell.model, cell.concept, seed, exc)).encode())
                except OSError:
                    pass  # the console line below still says it
                tqdm.write(f"attnprobe study: {cell.describe()} failed: {first_line(exc)}", file=sys.stderr)
            bar.update()
    except KeyboardInterrupt as exc:
        interrupted = exc
        tqdm.write(f"attnprobe study: {str(exc) or 'interrupted'}; what finished is kept (run again to resume)",
                   file=sys.stderr)
    finally:
        bar.close()
    if procs.world > 1:
        line = done_line(counts["done"], skipped if procs.is_main else 0, counts["failed"], counts["partial"])
        print(f"attnprobe study{where}: {line}", file=sys.stderr)
        if interrupted:
            raise interrupted
        procs.wait()  # every process's cells are written: the main process merges them
    if not procs.is_main:
        return StudyResult(out=out, done=counts["done"], failed=counts["failed"], partial=counts["partial"])
    scorer_name = getattr(plan.scorer, "name", None)
    MERGING.set()
    try:
        with writing(out, then="every table and figure is whole (the previous merge's, or this one's where it was "
                          "already in place) and every finished generation is kept: run the same command again to merge"):
            result = _merge(out, cells, plan.models, plan.concepts, plan.seeds, list(plan.variants) + list(plan.rows),
                            scorer_name=scorer_name, settings=key, presence_range=checked_range(plan.scorer),
                            interventions=list(plan.rows))
    except KeyboardInterrupt:
        tqdm.write("attnprobe study: stopped while merging: the tables, figures and report are the previous merge's "
                   "(none if there was none); run the same command again to merge", file=sys.stderr)
        raise
    finally:
        MERGING.clear()
    result.skipped = skipped
    if echo:
        shown = plan.size or (measure.default_size(pipe, plan.models[0]) if len(plan.models) == 1 and pipe else "native")
        print(format_summary(result, model=", ".join(plan.models), steps=plan.steps, guidance=plan.guidance,
                             size=shown, frames=plan.frames, scorer=scorer_name, scorer_kind=scorer_kind(plan.scorer),
                             random_weights=[m for m in plan.models if m in TINY_MODELS]))
    if interrupted:
        raise interrupted
    return result


def _device(device, procs) -> torch.device:
    """The device of this process: ``"auto"``: CUDA if available (under accelerate, the process's own GPU)."""
    if device == "auto":
        device = procs.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but this torch ({torch.__version__}) sees no CUDA device")
    if procs.world > 1 and procs.device is not None and device.type == procs.device.type and device != procs.device:
        if procs.is_main:
            warn(f"device {str(device)!r} under {procs.world} processes: each process uses its own, "
                  f"{str(procs.device)!r} here")
        device = procs.device
    return device


def _ready_pipeline(model, device, dtype, concepts, variants, rows, steps, guidance, size=None, frames=None):
    """Load a model and check that every prompt, intervention row, the image size and a video model's frame count
    apply to it, before it generates."""
    pipe = load_pipeline(model, str(device), dtype)
    family = checked_family(pipe, denoiser_of(pipe))  # a refused or unknown denoiser fails here, not in every cell
    if family.video is not None:
        check_frames(pipe, frames, model)  # its num_frames and a count its temporal compression can make
    elif frames is not None:
        raise ConfigError(f"frames={frames}: model {model!r} ({family.title}) makes images; frames is for video models "
                          "(leave it out for a study of image models, or one mixing both)")
    measure.check_makes_images(pipe)  # so does a pipeline that makes no image (Stable Cascade's prior)
    if size is not None:  # its factor and memory (the native size fits the model)
        images = 1 if family_of(denoiser_of(pipe)).one_prompt else len(variants)
        measure.check_size(pipe, int(size), images)
    measure.check_prompts(pipe, concepts, variants)
    for concept in concepts:  # every intervention row must apply here (concept, window, pipeline), before generating
        for items in rows.values():
            with intervene(pipe, items, variants["baseline"].format(c=concept), concept=concept) as run:
                run.check(steps, guidance)
    return pipe


def _merge(out: Path, cells, models, concepts, seeds, names, scorer_name=None, settings=None,
           presence_range=None, interventions=()) -> "StudyResult":
    """The study's outputs from every shard of the grid: the same files whichever processes measured the cells."""
    from types import SimpleNamespace

    result = StudyResult(out=out)
    figures = collect(out, cells, seeds, result, scorer_name, settings=settings)
    result.summary = summarize(result.aucs, result.text, models, concepts, names, presence_range)
    variants = [n for n in names if n not in interventions]
    result.contrasts = contrast_rows(result.aucs, models, concepts, variants, interventions, interval=interval)
    result.where_when = where_when_rows(result.where_when_data, interval)
    # every new file is written beside the one it replaces, and replaces it only when all of them are complete: a
    # merge killed or out of disk space keeps the previous merge's tables and figures (files.Staged)
    with Staged() as staged:
        written: dict[Path, bytes] = {}

        def write(path, data: bytes) -> Path:  # staged, and kept for the page, which embeds every table and figure
            written[Path(path)] = data
            return staged.write(path, data)

        result.files = write_tables(result, out, write)
        for model in models:
            folder = out if len(models) == 1 else out / "figures" / slug(model)
            mine = SimpleNamespace(**{k: [r for r in getattr(result, k) if r["model"] == model]
                                      for k in ("summary", "text", "contrasts", "where_when")})
            note = (f"{model}: random weights, so these numbers test the plumbing, not the question (run --model "
                    "shapes, or a real model)") if model in TINY_MODELS else None
            result.files += write_figures(mine, folder, figures[model], write, note=note)
        result.files.append(write_page(out, written, result.browser, staged.write))
        staged.commit()
    # an old output that this merge did not write again (figures of a model no longer in the grid…) would mix with
    # this one's: removed, now that this merge's files are in place
    remove_unlisted(out, OUTPUT_FILES, result.files)
    return result


def _run_cell(pipe, cell, plan: "_Plan"):
    """One cell's record (every row with its ``model``) and tensors: a generation, or the text analysis."""
    if cell.kind == "text":
        prompts = {v: t.format(c=cell.concept) for v, t in plan.variants.items()}
        # encode_text rebuilds the CLIP conditioning of UNet pipelines; every other family's encoders are read
        # through the pipeline's own encode_prompt
        rebuilt = text_unsupported(pipe) is None and denoiser_of(pipe) is getattr(pipe, "unet", None)
        try:
            rows = similarity_rows(pipe, cell.concept, prompts, encode=None if rebuilt else pipeline_encoding)
        except AttnprobeError as exc:
            if isinstance(exc, ConceptError) or rebuilt:
                raise
            if cell.model not in plan.notes:
                plan.notes.add(cell.model)
                warn(f"{cell.model}: text similarity skipped: {exc}")
            rows = []
        record, tensors = {"text": rows}, {}
    else:
        size = int(plan.size or measure.default_size(pipe, cell.model))
        maps = plan.out / "maps" / cell.id if plan.capture["save"] else None
        frames = check_frames(pipe, plan.frames, cell.model) if is_video(pipe) else None
        record, tensors = measure.measure_cell(pipe, cell.concept, cell.seed, plan.variants, plan.steps, plan.guidance, size,
                                        interventions=plan.rows, scorer=plan.scorer, capture=plan.capture, maps=maps,
                                        frames=frames)
    for key in ("trajectories", "aucs", "failures", "text"):
        record[key] = [{"model": cell.model, **r} for r in record.get(key, [])]
    return record, tensors


