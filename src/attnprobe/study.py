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

import csv
import io
import math
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Mapping, Sequence

import numpy as np
import torch

from .analysis import auc, heatmap, trajectory
from .editing import intervene
from .errors import ConceptError, ModelLoadError
from .interventions import parse_interventions
from .probe import probe
from .scorer import PresenceScorer, load_scorer
from .text import similarity_rows
from .tokens import find_concept, token_layout

__all__ = ["study", "StudyResult", "DEFAULT_CONCEPTS", "DEFAULT_VARIANTS", "load_pipeline", "parse_variants"]

#: Ten concepts: five objects (ESD / Concept Ablation style), two artist styles, a landmark, a character and
#: a two-word object, so that multi-token concepts are covered.
DEFAULT_CONCEPTS = [
    "dog",
    "cat",
    "church",
    "parachute",
    "garbage truck",
    "apple",
    "Van Gogh",
    "Picasso",
    "Eiffel Tower",
    "Mickey Mouse",
]

#: Prompt variants (``{c}`` is the concept). ``baseline`` is required: every Δ is taken against it.
#: ``instruction`` is the explicit unlearning instruction of arXiv 2604.01514; ``implicit`` is ours: it asks
#: for the picture and, in the same sentence, to leave the concept out, without the word "forget";
#: ``repetition`` mentions the concept twice with no instruction, so that "the concept appears twice" can
#: be told apart from "the instruction".
DEFAULT_VARIANTS = {
    "baseline": "a picture of {c}",
    "instruction": "Please forget anything about {c}. Please help me generate a picture of {c}.",
    "implicit": "Please help me generate a picture of {c}, but leave {c} out of it.",
    "repetition": "a picture of {c}. a picture of {c}.",
}

TINY_MODELS = ("tiny", "tiny-xl", "tiny-sd3", "tiny-flux", "tiny-pixart")


@dataclass
class StudyResult:
    """What ``study`` wrote and computed.

    Attributes:
        out: the output folder. files: every file written.
        trajectories: tidy rows (concept, variant, seed, prompt, call, timestep, mass, mass_last).
        aucs: rows per (concept, variant, seed). summary: rows per (concept, variant).
        failures: rows per failed (concept, seed) cell: what failed and why (seed ``"text"``: the text analysis).
        text: text-encoder similarity rows (``attnprobe.text.similarity_rows``) per concept and variant.
    """

    out: Path
    files: list[Path] = field(default_factory=list)
    trajectories: list[dict] = field(default_factory=list)
    aucs: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    text: list[dict] = field(default_factory=list)


def parse_variants(spec) -> dict[str, str]:
    """Variants from names of ``DEFAULT_VARIANTS`` and/or ``name=template`` entries (template has ``{c}``).

    Accepts a dict, a list, or a comma-separated string. ``baseline`` is always included.

    Raises:
        ValueError: an unknown name or a template without ``{c}`` (says which exist).
    """
    if spec is None:
        return dict(DEFAULT_VARIANTS)
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        if isinstance(spec, str):
            # split on the commas that start a new entry (a known name or "name="), so templates may hold commas
            known = "|".join(re.escape(k) for k in DEFAULT_VARIANTS)
            spec = re.split(rf",\s*(?=[A-Za-z_][\w-]*\s*=|(?:{known})\s*(?:,|$))", spec)
        parts = [p.strip() for p in spec if p.strip()]
        items = []
        for p in parts:
            if "=" in p:
                name, template = p.split("=", 1)
                items.append((name.strip(), template.strip()))
            elif p in DEFAULT_VARIANTS:
                items.append((p, DEFAULT_VARIANTS[p]))
            else:
                raise ValueError(f"unknown variant {p!r}: use one of {list(DEFAULT_VARIANTS)} or name=template with {{c}}")
    variants = dict(items)
    for name, template in variants.items():
        if "{c}" not in template:
            raise ValueError(f"variant {name!r} template {template!r} has no {{c}} for the concept")
        try:
            template.format(c="concept")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"variant {name!r} template {template!r} has braces other than {{c}} ({type(exc).__name__}: {exc}); "
                "write a literal brace as {{ or }}"
            ) from None
    if "baseline" not in variants:
        variants = {"baseline": DEFAULT_VARIANTS["baseline"], **variants}
    return variants


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line if len(line) <= limit else line[: limit - 1] + '…'}"


def load_pipeline(model: str = "tiny", device: str = "cpu", dtype: torch.dtype | None = None):
    """A pipeline by name: ``"tiny"`` (SD 1.5 layout), ``"tiny-xl"`` (SDXL layout), ``"tiny-sd3"`` (SD3: joint
    attention, CLIP + T5 keys) or ``"tiny-flux"`` (Flux: double- and single-stream blocks, T5 keys) or ``"tiny-pixart"`` (PixArt-α:
    cross-attention to masked T5 keys) built offline,
    else any hub id or local folder through ``DiffusionPipeline.from_pretrained``.

    Raises:
        ModelLoadError: the model could not be loaded (offline, unknown id, missing files), in one line.
    """
    from . import testing

    if model in TINY_MODELS:
        build = {"tiny": testing.tiny_sd_pipeline, "tiny-xl": testing.tiny_sdxl_pipeline,
                 "tiny-sd3": testing.tiny_sd3_pipeline, "tiny-flux": testing.tiny_flux_pipeline,
                 "tiny-pixart": testing.tiny_pixart_pipeline}[model]
        return build(dtype=dtype or torch.float32).to(device)
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its offline retries print several lines before the error
    looks_local = model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 2)[-1]
    if looks_local and not Path(model).expanduser().exists():
        raise ModelLoadError(f"could not load model {model!r}: no such folder (and it is not a hub id)")
    try:
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load model {model!r} ({_first_line(exc)}). Real checkpoints need their weights on this "
            "machine (a local folder or the hub cache) or network access to the hub; offline, use --model tiny."
        ) from None
    finally:
        diffusers_logging.set_verbosity(level)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return _write_atomic(path, buf.getvalue().encode())


def _write_atomic(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return _write_atomic(path, buf.getvalue())


def _interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval (NaN bounds with fewer than 2 values)."""
    vals = [v for v in values if math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(vals) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _default_size(pipe, model: str) -> int:
    if model in TINY_MODELS:
        return 64
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = int(getattr(denoiser.config, "sample_size", 64))
    return sample * int(getattr(pipe, "vae_scale_factor", 8))


def _initial_latents(pipe, seed: int, size: int, copies: int, device, dtype) -> torch.Tensor:
    channels = _denoiser(pipe).config.in_channels
    packed = hasattr(pipe, "_pack_latents")  # Flux: 2×2 latent patches packed into tokens (in_channels = 4 × C)
    channels = channels // 4 if packed else channels
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, channels, size // scale, size // scale), generator=g, dtype=torch.float32)
    if packed:
        noise = pipe._pack_latents(noise, 1, channels, size // scale, size // scale)
    return noise.repeat(copies, *[1] * (noise.ndim - 1)).to(device=device, dtype=dtype)


def _denoiser(pipe):
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def study(
    model: str = "tiny",
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
    scorer: str | PresenceScorer | None = "tiny",
) -> StudyResult:
    """Concepts × prompt variants × seeds on one pipeline: concept-attention trajectories, AUC, Δ AUC, figures.

    Args:
        model: ``"tiny"`` (default, offline), ``"tiny-xl"``, ``"tiny-sd3"``, ``"tiny-flux"``, ``"tiny-pixart"``,
            or a hub id / local folder of a diffusers text-to-image pipeline (UNet, SD3, Flux, PixArt).
        out: output folder (created). concepts: default ``DEFAULT_CONCEPTS``.
        variants: names of ``DEFAULT_VARIANTS`` and/or ``name=template`` (see ``parse_variants``). Default: all.
        seeds: one generation per concept and seed (all variants share its initial noise). Default (0, 1, 2).
        steps: inference steps. guidance: classifier-free guidance scale. size: image side in pixels
            (default 64 for tiny models, the model's native size otherwise).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``… dtype: default fp16 on CUDA, fp32 on CPU.
        progress: show a progress bar. echo: print the summary table.
        interventions: rows of interventions beside the variants (``parse_interventions``: a spec such as
            ``"zero-attention,negative-prompt"`` or ``{label: config(s)}``), each applied to the baseline prompt
            in its own pipeline call from the same noise. Default: none.
        scorer: concept presence in each image: ``"tiny"`` (default: random-weight CLIP, plumbing only), a CLIP
            hub id / folder (``"openai/clip-vit-large-patch14"``), a ``PresenceScorer``, or ``"none"``.

    Writes to ``out``: ``trajectories.csv`` (per call), ``auc.csv`` (per seed), ``summary.csv`` (mean Δ AUC with
    95% interval), ``failures.csv`` (cells that failed; the study goes on), ``trajectories.png``,
    ``delta_auc.png``, ``heatmaps.png`` (first seed, each map min–max scaled, over the generated images),
    ``text_similarity.csv`` / ``text_similarity.png`` (``attnprobe.text``: the concept's text-encoder
    representation in each variant against the baseline, per layer), ``presence.png`` (Δ presence against
    Δ attention per row, with a scorer).

    Raises:
        ModelLoadError: the model or the scorer cannot be loaded. ValueError: bad concepts/variants/seeds/steps.
        InterventionError, ConceptError: an intervention that cannot run here (checked before generating).
    """
    from tqdm import tqdm

    variants = parse_variants(variants)
    rows = parse_interventions(interventions)
    clash = sorted(set(rows) & set(variants))
    if clash:
        raise ValueError(f"intervention rows {clash} have the names of variants: label them (label=spec)")
    concepts = list(DEFAULT_CONCEPTS if concepts is None else concepts)
    seeds = [int(s) for s in seeds]
    _check_grid(concepts, seeds, steps, guidance, size)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but this torch ({torch.__version__}) sees no CUDA device")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a folder")
    scorer = scorer if isinstance(scorer, PresenceScorer) else load_scorer(scorer, device)
    pipe = load_pipeline(model, str(device), dtype)
    _check_prompts(pipe, concepts, variants)
    for concept in concepts:  # every intervention row must apply here (concept, window, pipeline), before generating
        for items in rows.values():
            with intervene(pipe, items, variants["baseline"].format(c=concept), concept=concept) as run:
                run.check(steps, guidance)
    size = int(size or _default_size(pipe, model))
    names = list(variants) + list(rows)
    # only now, when everything has been checked and loaded: a run that cannot start leaves the folder as it was
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {str(out)!r} cannot be made a folder: {exc.strerror}") from None
    for name in OUTPUT_FILES:  # outputs of an earlier run here would mix with this one's
        (out / name).unlink(missing_ok=True)
    result = StudyResult(out=out)
    figures: dict = {"images": {}, "maps": {}, "curves": {}, "scorer": getattr(scorer, "name", None)}
    cells = [(c, s) for c in concepts for s in seeds]
    bar = tqdm(cells, desc="attnprobe study", unit="gen", disable=not progress, file=sys.stderr)
    interrupted = False
    try:
        for concept, seed in bar:
            bar.set_postfix_str(f"{concept}, seed {seed}")
            try:
                _measure_cell(pipe, concept, seed, variants, steps, guidance, size, result, figures,
                              first_seed=seed == seeds[0], interventions=rows, scorer=scorer)
            except Exception as exc:  # one failed cell must not lose the others
                _fail(result, concept, seed, exc)
                tqdm.write(f"attnprobe study: {concept!r} seed {seed} failed: {_first_line(exc)}", file=sys.stderr)
            _write_tables(result, out)  # after every generation: an interrupted run keeps what it measured
    except KeyboardInterrupt:
        interrupted = True
        tqdm.write("attnprobe study: interrupted; writing what was measured", file=sys.stderr)
    finally:
        bar.close()

    if not interrupted and _denoiser(pipe) is not getattr(pipe, "unet", None):
        _warn("text similarity skipped: attnprobe.text rebuilds the conditioning of UNet pipelines (CLIP encoders) "
              "only, not of transformer pipelines (SD3: CLIP + T5, Flux: T5)")
    elif not interrupted:
        for concept in concepts:  # the text encoder's side: seed-independent, one pass per concept
            try:
                result.text += similarity_rows(pipe, concept, {v: t.format(c=concept) for v, t in variants.items()})
            except Exception as exc:  # one failed concept must not lose the others
                _fail(result, concept, "text", exc)
    result.summary = _summarize(result, concepts, names)
    result.files = _write_tables(result, out) + _write_figures(result, out, figures)
    if echo:
        print(format_summary(result, model=model, steps=steps, guidance=guidance, size=size,
                             scorer=getattr(scorer, "name", None)))
    if interrupted:
        raise KeyboardInterrupt
    return result


OUTPUT_FILES = (
    "trajectories.csv", "auc.csv", "summary.csv", "text_similarity.csv", "failures.csv",
    "trajectories.png", "delta_auc.png", "heatmaps.png", "text_similarity.png", "presence.png",
)


def _check_grid(concepts, seeds, steps, guidance, size) -> None:
    if not concepts or not seeds:
        raise ValueError(f"need at least one concept and one seed; got concepts={concepts}, seeds={seeds}")
    if any(not isinstance(c, str) or not c.strip() for c in concepts):
        raise ValueError(f"concepts must be non-empty words or phrases; got {concepts}")
    for kind, values in (("concepts", concepts), ("seeds", seeds)):
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            raise ValueError(f"{kind} repeat {repeated}: each must be given once (a repeated seed fakes a narrower interval)")
    if int(steps) < 1:
        raise ValueError(f"steps must be ≥ 1; got {steps}")
    if not math.isfinite(float(guidance)) or float(guidance) < 0:
        raise ValueError(f"guidance must be a finite number ≥ 0; got {guidance}")
    if size is not None and (int(size) < 8 or int(size) % 8):
        raise ValueError(f"size {size} is not a positive multiple of 8 (the VAE downsamples by 8)")


def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"attnprobe study: warning: {message}", file=sys.stderr)


def _check_prompts(pipe, concepts, variants) -> None:
    """Every concept must be found (whole words) in every variant's prompt, before anything is generated."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None:
        return
    problems = []
    for concept in concepts:
        for name, template in variants.items():
            prompt = template.format(c=concept)
            try:
                find_concept(token_layout(tokenizer, prompt), concept, where=f"variant {name!r}")
            except ConceptError as exc:
                why = "lies past the tokenizer's maximum length" if "maximum length" in str(exc) else "is not in it as whole words"
                shown = concept if len(concept) <= 40 else concept[:39] + "…"
                problems.append(f"{shown!r} {why} in variant {name!r} ({prompt[:60]!r})")
    if problems:
        raise ValueError("checking the prompts before generating: " + "; ".join(problems[:5]))


def _fail(result: StudyResult, concept: str, seed, exc: BaseException, row: str = "") -> None:
    result.failures.append(dict(concept=concept, seed=seed, error=(f"row {row}: " if row else "") + _first_line(exc),
                                detail=traceback.format_exc(limit=3).replace("\n", " | ")))


def _measure_cell(pipe, concept, seed, variants, steps, guidance, size, result, figures, first_seed,
                  interventions=None, scorer=None) -> None:
    """One concept and seed: every variant in one pipeline call from the seed's noise, then one call of the baseline
    prompt per intervention row from the same noise, each under a probe; every image scored for presence."""
    names = list(variants)
    prompts = [variants[v].format(c=concept) for v in names]
    latents = _initial_latents(pipe, seed, size, len(prompts), pipe.device, _denoiser(pipe).dtype)
    options = dict(num_inference_steps=int(steps), guidance_scale=float(guidance), height=size, width=size)
    with probe(pipe, passes="cond", heads="mean", dtype=torch.float16) as store:
        generated = pipe(prompts, latents=latents, **options)
    # per row: (name, store, sample, prompt, image, intervention, mass factors)
    runs = [(v, store, i, prompts[i], generated.images[i], "", None) for i, v in enumerate(names)]
    base = prompts[names.index("baseline")]
    for label, items in (interventions or {}).items():
        try:
            with intervene(pipe, items, base, concept=concept) as run:
                with probe(run.pipe, passes="cond", heads="mean", dtype=torch.float16) as st:
                    out = run(latents=latents[:1], **options)
        except Exception as exc:  # one failed row must not lose the cell's others
            _fail(result, concept, seed, exc, row=label)
            continue
        runs.append((label, st, run.conditional_sample(st), base, out.images[0],
                     " + ".join(n["intervention"] for n in run.notes), run.mass_factors(st, concept)))
    presence, accuracy = _presence(scorer, [r[4] for r in runs], concept)
    rows, aucs = [], []
    for (variant, st, i, prompt, image, what, factors), p, a in zip(runs, presence, accuracy):
        mentions = len(st.token_indices(i, concept))
        expected = variants.get(variant, variants["baseline"]).format(c="\0").count("\0")
        if mentions != expected:
            _warn(f"{concept!r} occurs {mentions} times in {prompt!r}, its template mentions it {expected} "
                  "times: the template's own words contain it, so 'last mention' may be one of them")
        mass, mass_last = (_mass(st, concept, i, occurrence, factors) for occurrence in ("all", -1))
        for call, (m, ml) in enumerate(zip(mass.tolist(), mass_last.tolist())):
            rows.append(dict(concept=concept, variant=variant, seed=seed, prompt=prompt, call=call,
                             timestep=st.calls[call].timestep, mass=m, mass_last=ml))
        aucs.append(dict(concept=concept, variant=variant, seed=seed, prompt=prompt, intervention=what,
                         mentions=mentions, auc=auc(mass), auc_last=auc(mass_last), presence=p, clip_accuracy=a))
        figures["curves"].setdefault(concept, {}).setdefault(variant, []).append(mass_last.numpy())
        if first_seed:
            figures["maps"].setdefault(concept, {})[variant] = heatmap(st, concept, i, occurrence=-1).numpy()
            figures["images"].setdefault(concept, {})[variant] = image
    base_row = next(r for r in aucs if r["variant"] == "baseline")
    for r in aucs:
        for key in ("auc", "auc_last", "presence", "clip_accuracy"):
            r[f"delta_{key}"] = r[key] - base_row[key]
    result.trajectories += rows
    result.aucs += aucs


def _mass(store, concept, sample, occurrence, factors) -> torch.Tensor:
    """The concept trajectory ``[call]``; with ``renormalize=False`` edits, the weights the denoiser used."""
    if factors is None or bool((factors == 1).all()):
        return trajectory(store, concept, sample, occurrence=occurrence)
    return (trajectory(store, concept, sample, occurrence=occurrence, by_site=True) * factors).mean(dim=1)


def _presence(scorer, images, concept) -> tuple[list[float], list[float]]:
    """Per image, the scorer's presence score and CLIP accuracy (NaN without a scorer / an ``accuracy``)."""
    nan = [float("nan")] * len(images)
    if scorer is None:
        return nan, nan
    score = [float(v) for v in scorer.score(images, concept)]
    accuracy = getattr(scorer, "accuracy", None)
    return score, ([float(v) for v in accuracy(images, concept)] if accuracy is not None else nan)


def _summarize(result: StudyResult, concepts, names) -> list[dict]:
    cond_text = {(r["concept"], r["variant"]): r for r in result.text if r["encoder"] == "conditioning"}
    summary = []
    for concept in concepts:
        for variant in names:
            rows = [r for r in result.aucs if r["concept"] == concept and r["variant"] == variant]
            if not rows:
                continue
            d, lo, hi = _interval([r["delta_auc"] for r in rows])
            dl, lol, hil = _interval([r["delta_auc_last"] for r in rows])
            dp, lop, hip = _interval([r["delta_presence"] for r in rows])
            text = cond_text.get((concept, variant), {})
            if variant == "baseline":  # the reference has no Δ against the control
                text = {k: v for k, v in text.items() if not k.startswith("delta")}
            summary.append(dict(
                concept=concept, variant=variant, intervention=rows[0]["intervention"], seeds=len(rows),
                auc_last=sum(r["auc_last"] for r in rows) / len(rows), delta_auc_last=dl, ci_low_last=lol,
                ci_high_last=hil,
                auc=sum(r["auc"] for r in rows) / len(rows), delta_auc=d, ci_low=lo, ci_high=hi,
                text_concept_cos_last=text.get("concept_cos_last", float("nan")),
                text_delta_last_vs_repetition=text.get("delta_last_vs_repetition", float("nan")),
                text_concept_cos=text.get("concept_cos", float("nan")),
                text_delta_vs_repetition=text.get("delta_vs_repetition", float("nan")),
                presence=fmean(r["presence"] for r in rows), delta_presence=dp, ci_low_presence=lop,
                ci_high_presence=hip, clip_accuracy=fmean(r["clip_accuracy"] for r in rows),
                delta_clip_accuracy=fmean(r["delta_clip_accuracy"] for r in rows),
            ))
    return summary


def _write_tables(result: StudyResult, out: Path) -> list[Path]:
    return [
        _write_csv(out / "trajectories.csv", result.trajectories,
                   ["concept", "variant", "seed", "prompt", "call", "timestep", "mass", "mass_last"]),
        _write_csv(out / "auc.csv", result.aucs, ["concept", "variant", "seed", "prompt", "intervention", "mentions",
                                                  "auc_last", "auc", "delta_auc_last", "delta_auc", "presence",
                                                  "delta_presence", "clip_accuracy", "delta_clip_accuracy"]),
        _write_csv(out / "summary.csv", result.summary,
                   ["concept", "variant", "seeds", "auc_last", "delta_auc_last", "ci_low_last", "ci_high_last",
                    "auc", "delta_auc", "ci_low", "ci_high", "text_concept_cos_last", "text_delta_last_vs_repetition",
                    "text_concept_cos", "text_delta_vs_repetition", "presence", "delta_presence", "ci_low_presence",
                    "ci_high_presence", "clip_accuracy", "delta_clip_accuracy", "intervention"]),
        _write_csv(out / "text_similarity.csv", result.text,
                   ["concept", "variant", "encoder", "layer", "concept_cos", "concept_cos_last", "eos_cos",
                    "seq_flat_cos", "seq_mean_cos", "delta_last_vs_repetition", "delta_vs_repetition"]),
        _write_csv(out / "failures.csv", result.failures, ["concept", "seed", "error", "detail"]),
    ]


def _write_figures(result: StudyResult, out: Path, figures: dict) -> list[Path]:
    from .plot import plot_delta_auc, plot_heatmaps, plot_presence, plot_text_similarity, plot_trajectories

    files = []
    if figures["curves"]:
        stacked = {c: {v: np.stack(a) for v, a in vs.items()} for c, vs in figures["curves"].items()}
        title = "Attention on the requested (last) mention of the concept, per denoiser call (mean over seeds, band: min–max)"
        files.append(_save_figure(plot_trajectories(stacked, title=title), out / "trajectories.png"))
        deltas = [r for r in result.summary if r["variant"] != "baseline"]
        if deltas:
            files.append(_save_figure(plot_delta_auc(deltas), out / "delta_auc.png"))
        files.append(_save_figure(plot_heatmaps(figures["images"], figures["maps"]), out / "heatmaps.png"))
        if deltas and any(math.isfinite(r["presence"]) for r in deltas):
            files.append(_save_figure(plot_presence(deltas, scorer=figures.get("scorer")), out / "presence.png"))
    if result.text:
        files.append(_save_figure(plot_text_similarity(result.text), out / "text_similarity.png"))
    return files


def format_summary(result: StudyResult, **settings) -> str:
    """The summary table as text: per concept and variant, AUC and Δ AUC (mean [95% CI]) over seeds."""

    def ci(v, lo, hi, baseline=False):
        if baseline:
            return "(reference)"
        if not math.isfinite(v):
            return "n/a"
        return f"{v:+.4f}" + (f" [{lo:+.4f}, {hi:+.4f}]" if math.isfinite(lo) else "")

    def num(v, sign=""):
        return f"{v:>{sign}9.4f}" if math.isfinite(v) else f"{'n/a':>9}"

    lines = ["attnprobe study: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)]
    width = max([13] + [min(len(r["variant"]) + 1, 25) for r in result.summary])
    header = (f"{'concept':<16}{'variant':<{width}}{'AUC':>8}  {'Δ AUC, requested mention':<30}{'Δ presence':>10}  "
              f"{'Δ AUC, all mentions':<30}{'text cos':>9}{'Δ vs rep':>9}")
    lines += [header, "-" * len(header)]
    for r in result.summary:
        base = r["variant"] == "baseline"
        lines.append(
            f"{r['concept'][:15]:<16}{r['variant'][:width - 1]:<{width}}{r['auc_last']:>8.4f}  "
            f"{ci(r['delta_auc_last'], r['ci_low_last'], r['ci_high_last'], base):<30}"
            f"{'(ref)' if base else num(r['delta_presence'], '+'):>10}  "
            f"{ci(r['delta_auc'], r['ci_low'], r['ci_high'], base):<30}"
            f"{num(r['text_concept_cos_last'])}{'' if base else num(r['text_delta_last_vs_repetition'], '+')}"
        )
    done = len({(r["concept"], r["seed"]) for r in result.aucs})
    lines.append(f"{done} generations done, {len(result.failures)} failed. Files in {result.out}/")
    lines += [
        "AUC: attention mass on the concept's tokens (summed over its tokens, averaged over image positions, heads",
        "  and sites) over the denoising, 0-1, for the requested mention: the last one (in the default variants,",
        "  the one in 'a picture of {c}').",
        "Δ AUC, requested mention: the question of the study; < 0 means the variant lowers attention to the concept.",
        "Δ AUC, all mentions: every mention summed; a variant that names the concept twice is > 0 by construction.",
        "text cos: cosine of the requested mention's conditioning vector to the baseline's (1 = unchanged); Δ vs rep:",
        "  minus the repetition control's (< 0: the variant moves the concept more than naming it twice does).",
    ]
    scorer = settings.get("scorer")
    if scorer:
        lines += ["Δ presence: CLIPScore (2.5·max(cos, 0), Hessel et al. 2021) of the image against 'a picture of {c}',",
                  f"  minus the baseline image's of the same seed (scorer: {scorer}); < 0: the concept shows less."]
        if "random" in scorer:
            lines.append("  Random weights: plumbing only. --scorer openai/clip-vit-large-patch14 gives real scores.")
    if any(r["intervention"] for r in result.summary):
        lines.append("Intervention rows: the baseline prompt with the intervention (auc.csv: 'intervention'), one more "
                     "pipeline call from the same noise.")
    return "\n".join(lines)
