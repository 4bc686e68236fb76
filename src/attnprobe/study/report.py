"""The study's outputs from its measured rows: tidy CSVs, the summary with 95% intervals, figures, the printed table
and its console warnings.

Pure functions of the rows that ``attnprobe.study`` measures (one dict per row), so that a one-process run and the
merge of many processes' shards write the same files. Files are written atomically (a temporary name, then a rename).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from statistics import fmean
from typing import Sequence

import numpy as np

from .._atomic import write_atomic
from .contrasts import CONTRAST_COLUMNS, MEASURES, WHERE_WHEN_COLUMNS
from ..analysis.figures import (
    plot_contrasts, plot_delta_auc, plot_frames, plot_heatmaps, plot_presence, plot_text_similarity, plot_trajectories,
    plot_where_when, shorten,
)

__all__ = ["OUTPUT_FILES", "interval", "answer_lines", "video_lines", "summarize", "write_tables", "write_figures", "format_summary", "done_line", "warn", "WARNED"]

#: the concepts frames.png draws (the first ones; report.html's frame selector shows every concept)
FRAME_CONCEPTS = 4

#: Every table and figure of a study's folder (rewritten by each run or merge; an old one not written again is removed).
OUTPUT_FILES = (
    "trajectories.csv", "auc.csv", "summary.csv", "text_similarity.csv", "failures.csv",
    "trajectories.png", "delta_auc.png", "heatmaps.png", "text_similarity.png", "presence.png",
    "contrasts.csv", "where_when.csv", "contrasts.png", "where_when.png", "frames.png", "report.html",
)

COLUMNS = {
    "trajectories.csv": ["model", "concept", "variant", "seed", "prompt", "call", "timestep", "mass", "mass_last"],
    "auc.csv": ["model", "concept", "variant", "seed", "prompt", "intervention", "mentions", "auc_last", "auc",
                "delta_auc_last", "delta_auc", "presence", "delta_presence", "clip_accuracy", "delta_clip_accuracy", "count", "delta_count"],
    "summary.csv": ["model", "concept", "variant", "seeds", "auc_last", "delta_auc_last", "ci_low_last", "ci_high_last",
                    "auc", "delta_auc", "ci_low", "ci_high", "text_concept_cos_last", "text_delta_last_vs_repetition",
                    "text_concept_cos", "text_delta_vs_repetition", "presence", "delta_presence", "ci_low_presence",
                    "ci_high_presence", "clip_accuracy", "delta_clip_accuracy", "count", "delta_count",
                    "ci_low_count", "ci_high_count", "intervention"],
    "text_similarity.csv": ["model", "concept", "variant", "encoder", "layer", "concept_cos", "concept_cos_last",
                            "eos_cos", "seq_flat_cos", "seq_mean_cos", "delta_last_vs_repetition", "delta_vs_repetition"],
    "failures.csv": ["model", "concept", "seed", "error", "detail"],
    "contrasts.csv": CONTRAST_COLUMNS,
    "where_when.csv": WHERE_WHEN_COLUMNS,
}


def _write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str], write=write_atomic) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return write(path, buf.getvalue().encode())


def _save_figure(fig, path: Path, write=write_atomic) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.1)  # no label cut at the edge
    plt.close(fig)
    return write(path, buf.getvalue())


def interval(values: Sequence[float], bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval (NaN bounds with fewer than 2 values), clipped to ``bounds`` when given (the
    range the values can take: a mean cannot leave it, while a t-interval of a few 0/1 values does)."""
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
    if bounds is None:
        return mean, mean - half, mean + half
    return mean, max(mean - half, bounds[0]), min(mean + half, bounds[1])


def summarize(aucs: Sequence[dict], text: Sequence[dict], models, concepts, names,
              presence_range: tuple[float, float] | None = None) -> list[dict]:
    """Per model, concept and row (variant or intervention): mean AUC, mean Δ with a 95% t-interval over seeds.

    ``presence_range``: the scorer's ``score_range`` (e.g. ``(0, 1)`` for a 0/1 checker); the Δ presence interval is
    clipped to what a difference of two such scores can be, ``±(high − low)``. ``None``: not clipped.
    """
    spread = None if presence_range is None else presence_range[1] - presence_range[0]
    cond_text = {(r["model"], r["concept"], r["variant"]): r for r in text if r["encoder"] == "conditioning"}
    summary = []
    for model in models:
        for concept in concepts:
            for variant in names:
                rows = [r for r in aucs if r["model"] == model and r["concept"] == concept and r["variant"] == variant]
                if not rows:
                    continue
                d, lo, hi = interval([r["delta_auc"] for r in rows])
                dl, lol, hil = interval([r["delta_auc_last"] for r in rows])
                dp, lop, hip = interval([r["delta_presence"] for r in rows], None if spread is None else (-spread, spread))
                dc, loc, hic = interval([r.get("delta_count", float("nan")) for r in rows])
                txt = cond_text.get((model, concept, variant), {})
                if variant == "baseline":  # the reference has no Δ against the control
                    txt = {k: v for k, v in txt.items() if not k.startswith("delta")}
                summary.append(dict(
                    model=model, concept=concept, variant=variant, intervention=rows[0]["intervention"],
                    seeds=len(rows), auc_last=sum(r["auc_last"] for r in rows) / len(rows), delta_auc_last=dl,
                    ci_low_last=lol, ci_high_last=hil,
                    auc=sum(r["auc"] for r in rows) / len(rows), delta_auc=d, ci_low=lo, ci_high=hi,
                    text_concept_cos_last=txt.get("concept_cos_last", float("nan")),
                    text_delta_last_vs_repetition=txt.get("delta_last_vs_repetition", float("nan")),
                    text_concept_cos=txt.get("concept_cos", float("nan")),
                    text_delta_vs_repetition=txt.get("delta_vs_repetition", float("nan")),
                    presence=fmean(r["presence"] for r in rows), delta_presence=dp, ci_low_presence=lop,
                    ci_high_presence=hip, clip_accuracy=fmean(r["clip_accuracy"] for r in rows),
                    delta_clip_accuracy=fmean(r["delta_clip_accuracy"] for r in rows),
                    count=fmean(r.get("count", float("nan")) for r in rows), delta_count=dc, ci_low_count=loc,
                    ci_high_count=hic,
                ))
    return summary


def write_tables(result, out: Path, write=write_atomic) -> list[Path]:
    """The CSVs of ``result`` (a ``StudyResult``) in ``out``.

    ``write(path, data: bytes) -> path`` writes each file: default ``write_atomic``; the study's merge passes
    ``files.Staged.write`` (each file under a temporary name until every one is written). Raises what ``write``
    raises (``OSError``, or ``StoreIOError`` from the merge's writer)."""
    tables = {"trajectories.csv": result.trajectories, "auc.csv": result.aucs, "summary.csv": result.summary,
              "text_similarity.csv": result.text, "failures.csv": result.failures, "contrasts.csv": result.contrasts,
              "where_when.csv": result.where_when}
    return [_write_csv(Path(out) / name, tables[name], COLUMNS[name], write) for name in COLUMNS]


def write_figures(result, out: Path, figures: dict, write=write_atomic, note: str | None = None) -> list[Path]:
    """The figures of one model's rows: ``figures`` holds ``curves`` {concept: {row: [call] arrays}}, ``maps`` and
    ``images`` {concept: {row: …}} of the first seed, and the scorer's name. ``write``: as in ``write_tables``.
    ``note``: printed in red under every figure (a model of random weights says so)."""
    out = Path(out)
    files = []

    def save(fig, path: Path) -> Path:
        if note:
            fig.text(0.5, 1.0, note, ha="center", va="bottom", color="crimson", fontsize=9, weight="bold")  # above all
        return _save_figure(fig, path, write)

    if figures["curves"]:
        stacked = {c: {v: np.stack(a) for v, a in vs.items()} for c, vs in figures["curves"].items()}
        title = "Attention on the requested (last) mention of the concept, per denoiser call (mean over seeds, band: min–max)"
        files.append(save(plot_trajectories(stacked, title=title), out / "trajectories.png"))
        deltas = [r for r in result.summary if r["variant"] != "baseline"]
        if deltas:
            files.append(save(plot_delta_auc(deltas), out / "delta_auc.png"))
        if figures["maps"]:
            fig = plot_heatmaps(figures["images"], figures["maps"])
            if figures.get("frames"):  # a video model: say which frame the still is
                fig.suptitle("Videos: the map averaged over latent frames, over each video's middle decoded frame "
                             "(frames.png: per latent frame)", fontsize=8)
            files.append(save(fig, out / "heatmaps.png"))
        if figures.get("frames"):
            # the question's two rows when the study has them (a strip per row of every concept made a page 6000 px
            # tall); report.html's frame selector shows every row
            concepts = list(figures["frames"])[:FRAME_CONCEPTS]
            pair = {c: {v: m for v, m in figures["frames"][c].items() if v in ("baseline", "instruction")}
                    or figures["frames"][c] for c in concepts}
            fig = plot_frames(pair)
            more = len(figures["frames"]) - len(concepts)
            fig.suptitle("Attention on the requested mention per latent frame (each concept's first seed; every site "
                         "and denoiser call; each strip scaled to its own min–max),\nover the decoded frame in the "
                         "middle of those the latent frame makes; every row"
                         + (f" and the {more} other concepts" if more > 0 else "") + ": report.html", fontsize=8)
            files.append(save(fig, out / "frames.png"))
        if deltas and any(math.isfinite(r["presence"]) for r in deltas):
            files.append(save(plot_presence(deltas, scorer=figures.get("scorer")), out / "presence.png"))
    if result.text:
        files.append(save(plot_text_similarity(result.text), out / "text_similarity.png"))
    if result.contrasts:
        files.append(save(plot_contrasts(result.contrasts, MEASURES), out / "contrasts.png"))
    if result.where_when:
        title = ("Where and when: Δ attention on the requested mention (row − baseline of the same seed), per site "
                 "(execution order; lines between query grids) and denoiser call, mean over seeds")
        files.append(save(plot_where_when(result.where_when, title), out / "where_when.png"))
    return files
def done_line(done: int, skipped: int, failed: int, partial: int = 0) -> str:
    """``N generations done (S of them skipped: finished by an earlier run; P with a failed part …), F failed.``

    ``partial``: generations done whose presence or one of whose rows failed (kept; failures.csv); ``failed``:
    generations that failed with nothing kept. Running the study again redoes both."""
    part = f"; {partial} with a failed part: failures.csv" if partial else ""
    again = " (running again redoes them)" if partial or failed else ""
    return (f"{done} generation{'s' if done != 1 else ''} done ({skipped} of them skipped: finished by an earlier "
            f"run{part}), {failed} failed{again}.")


def answer_lines(contrasts: Sequence[dict]) -> list[str]:
    """The study's answer in a few lines, from ``contrasts.csv``'s rows: per model, contrast and measure, how many
    concepts' 95% intervals lie below 0 and above 0, the mean over concepts and the smallest Holm-adjusted p."""
    if not contrasts:
        return []
    lines = ["The answer, paired by seed (contrasts.csv, contrasts.png): does each row lower attention beyond its "
             "reference?"]
    several = len({r["model"] for r in contrasts}) > 1
    lines += _verdicts(contrasts, several)
    for key in dict.fromkeys((r["model"], r["variant"], r["reference"], r["measure"]) for r in contrasts):
        rows = [r for r in contrasts if (r["model"], r["variant"], r["reference"], r["measure"]) == key
                and math.isfinite(r["mean"])]
        if not rows:
            continue
        model, row, reference, measure = key
        below = sum(r["ci_high"] < 0 for r in rows)
        above = sum(r["ci_low"] > 0 for r in rows)
        p = min((r["p_holm"] for r in rows if math.isfinite(r["p_holm"])), default=float("nan"))
        n = sorted({r["n"] for r in rows})
        tests = ", ".join(sorted({r["test"] for r in rows}))
        lines.append(f"  {model + ': ' if several else ''}{row} − {reference}, {MEASURES[measure]}: mean "
                     f"{fmean(r['mean'] for r in rows):+.4f} over {len(rows)} concept{'s' * (len(rows) != 1)}; 95% CI "
                     f"below 0 for {below}, above 0 for {above}; smallest Holm p {p:.2g} ({tests}, n="
                     f"{'–'.join(map(str, (n[0], n[-1]))) if len(n) > 1 else n[0]} seeds)")
    n = min((r["n"] for r in contrasts if r["test"] == "sign-flip exact" and r["n"] > 0), default=None)
    if n is not None and any(r["test"] == "sign-flip exact" and r["n"] == n and math.isclose(r["p_value"], 2 / 2 ** n)
                             for r in contrasts):
        lines.append(f"  p = {2 / 2 ** n:.3g} (2/2^n) is the smallest the exact test gives with {n} seeds: every seed's "
                     "difference had the same sign.")
    if n is not None and 2 / 2 ** n > 0.05:
        lines.append(f"  With {n} seeds the exact test cannot go below p = {2 / 2 ** n:.2g} (2/2^n), before Holm: "
                     "more seeds (6 or more) can show a change at the 5% level. The t-intervals assume normal "
                     "differences and can exclude 0 where the test cannot: they show the direction, the test decides.")
    elif any(math.isfinite(r["ci_low"]) and math.isfinite(r["ci_high"]) and not r["ci_low"] <= 0 <= r["ci_high"]
             and math.isfinite(r["p_holm"]) and r["p_holm"] >= 0.05 for r in contrasts):
        lines.append("  Some 95% t-intervals exclude 0 where Holm's p is ≥ 0.05: the intervals assume normal "
                     "differences and are not corrected across concepts; they show the direction, the test decides.")
    return lines + [""]


def _verdicts(contrasts: Sequence[dict], several: bool) -> list[str]:
    """The question in words, per model: instruction − repetition on the requested mention's Δ AUC."""
    out = []
    for model in dict.fromkeys(r["model"] for r in contrasts):
        rows = [r for r in contrasts if (r["model"], r["variant"], r["reference"], r["measure"]) == (
            model, "instruction", "repetition", "delta_auc_last") and math.isfinite(r["mean"])]
        if not rows:
            continue
        lower = [r for r in rows if r["ci_high"] < 0 and r["p_holm"] < 0.05]
        higher = [r for r in rows if r["ci_low"] > 0 and r["p_holm"] < 0.05]
        where = f"{model}: " if several else ""
        if lower:
            out.append(f"  Verdict: {where}the instruction lowers attention on the concept beyond naming it twice for "
                       f"{len(lower)} of {len(rows)} concepts (95% interval below 0 and Holm p < 0.05).")
        elif higher:
            out.append(f"  Verdict: {where}no evidence that the instruction lowers attention on the concept beyond "
                       f"naming it twice: it raises it over naming it twice for {len(higher)} of {len(rows)} "
                       "concepts (instruction − repetition, Δ AUC of the requested mention: 95% interval above 0 and "
                       "Holm p < 0.05; the table's Δ is against the baseline).")
        else:
            direction = ("higher" if all(r["mean"] > 0 for r in rows) else "lower" if all(r["mean"] < 0 for r in rows)
                         else "mixed")
            out.append(f"  Verdict: {where}no evidence that the instruction lowers attention on the concept beyond "
                       f"naming it twice (instruction − repetition, Δ AUC of the requested mention: {direction} for "
                       f"the {len(rows)} concept{'s' * (len(rows) != 1)}, none with Holm p < 0.05).")
    return out


#: what the shapes model's answer is about, said wherever its answer is (the summary, report.html)
SHAPES_NOTE = ("shapes: attnprobe's small model trained offline on 32 × 32 scenes of coloured shapes, from scene "
               "descriptions only: it never saw an instruction, and its text encoder has no transformer layers (the "
               "text cosines reflect positions only). Its answer is a finding about this toy model, not about a large "
               "text-to-image model.")


def format_summary(result, *, scorer_kind: str | None = None, random_weights=(), **settings) -> str:
    """The summary table as text: per concept and variant, AUC and Δ AUC (mean [95% CI]) over seeds.

    ``scorer_kind``: ``"clip"`` (CLIPScore), ``"shapes"`` (the shapes checker) or anything else (a user's scorer,
    described by its name only); ``None``: taken from the ``scorer`` setting's name. ``random_weights``: the models
    of random weights (said first: their numbers are plumbing).
    """


    def ci(v, lo, hi, baseline=False):
        if baseline:
            return "(reference)"
        if not math.isfinite(v):
            return "n/a"
        return f"{v:+.4f}" + (f" [{lo:+.4f}, {hi:+.4f}]" if math.isfinite(lo) else "")

    def num(v, sign=""):
        return f"{v:>{sign}9.4f}" if math.isfinite(v) else f"{'n/a':>9}"

    lines = ["attnprobe study: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)]
    if random_weights:
        lines.append(f"{', '.join(random_weights)}: random weights, so these numbers test the plumbing, not the "
                     "question (run --model shapes, or a real model)")
    if any(r["model"] == "shapes" for r in result.summary):
        lines.append(SHAPES_NOTE)
    lines += answer_lines(getattr(result, "contrasts", []))
    width = max([13] + [min(len(r["variant"]) + 1, 25) for r in result.summary])
    header = (f"{'concept':<16}{'variant':<{width}}{'AUC':>8}  {'Δ AUC, requested mention':<30}{'Δ presence':>10}  "
              f"{'Δ AUC, all mentions':<30}{'text cos':>9}{'Δ vs rep':>9}")
    lines += [header, "-" * len(header)]
    several = len({r["model"] for r in result.summary}) > 1
    model = None
    for r in result.summary:
        if several and r["model"] != model:
            model = r["model"]
            lines.append(f"model {model}:")
        base = r["variant"] == "baseline"
        lines.append(
            f"{shorten(r['concept'], 15):<16}{shorten(r['variant'], width - 1):<{width}}{r['auc_last']:>8.4f}  "
            f"{ci(r['delta_auc_last'], r['ci_low_last'], r['ci_high_last'], base):<30}"
            f"{'(ref)' if base else num(r['delta_presence'], '+'):>10}  "
            f"{ci(r['delta_auc'], r['ci_low'], r['ci_high'], base):<30}"
            f"{num(r['text_concept_cos_last'])}{'' if base else num(r['text_delta_last_vs_repetition'], '+')}"
        )
    lines.append(f"{done_line(result.done, result.skipped, result.failed, result.partial)} Files in {result.out}/")
    lines += [
        "AUC: attention mass on the concept's tokens (summed over its tokens, averaged over image (or video) positions,",
        "  heads and sites) over the denoising, 0-1, for the requested mention: the last one (in the default variants,",
        "  the one in the baseline's words).",
        "Δ AUC, requested mention: the question of the study; < 0 means the variant lowers attention to the concept.",
        "Δ AUC, all mentions: every mention summed; a variant that names the concept twice is > 0 by construction",
        "  where padding takes attention (CLIP; T5 in SD3 and Flux); where the pipeline masks it (PixArt, Sana, Lumina,",
        "  Kandinsky 3, Qwen-Image, HunyuanImage, Z-Image) a longer prompt lowers every token's share, so",
        "  there Δ AUC mixes prompt length with the effect asked about.",
        "text cos: cosine of the requested mention's conditioning vector to the baseline's (1 = unchanged); Δ vs rep:",
        "  minus the repetition control's (< 0: the variant moves the concept more than naming it twice does).",
    ]
    scorer = settings.get("scorer")
    if scorer_kind is None and scorer:
        scorer_kind = "shapes" if scorer.startswith("shapes") else "clip"
    if scorer and scorer_kind not in ("shapes", "clip"):
        lines += [f"Δ presence: the score of scorer {scorer!r} for the image minus the baseline image's of the same seed;",
                  "  < 0: the concept shows less."]
    elif scorer and scorer_kind == "shapes":
        lines += ["Δ presence: share of images that show the concept (read back by attnprobe.models.shapes.scenes.read_scene: 1 if",
                  "  an object has the concept's colour and shape) minus the baseline's; < 0: the concept shows less."]
    elif scorer:
        lines += ["Δ presence: CLIPScore (2.5·max(cos, 0), Hessel et al. 2021) of the image against 'a picture of {c}',",
                  f"  minus the baseline image's of the same seed (scorer: {scorer}); < 0: the concept shows less."]
        if "random" in scorer:
            lines.append("  Random weights: plumbing only. --scorer openai/clip-vit-large-patch14 gives real scores.")
    if scorer:
        figure = " and presence.png" if any(math.isfinite(r["delta_presence"]) for r in result.summary) else ""
        lines += [f"  Its 95% interval over seeds is in summary.csv (ci_low_presence, ci_high_presence){figure},",
                  "  cut to the range a difference of two scores can take (±(high − low) of the scorer's score_range)."]
    lines += video_lines(getattr(result, "videos", {}), bool(scorer))
    if any(r["intervention"] for r in result.summary):
        lines.append("Intervention rows: the baseline prompt with the intervention (auc.csv: 'intervention'), one more "
                     "pipeline call from the same noise.")
    return "\n".join(lines)


def video_lines(videos: dict, scored: bool) -> list[str]:
    """What a video model's numbers and figures are of (``videos``: ``{model: frame record}``, ``study.video``)."""
    lines = []
    for model, v in videos.items():
        lines += [f"Video ({model}): {v['frames']} frames per video ({v['latent_frames']} latent frames). Trajectories and AUCs",
                  "  average every video position (each latent frame weighs the same); heatmaps.png averages the latent",
                  f"  frames over each video's middle decoded frame (frame {v['shown']} of 0–{v['frames'] - 1});",
                  "  frames.png shows each latent frame" + ("; Δ presence scores the middle frame only." if scored else ".")]
    return lines


#: warnings already printed by the study in progress (a cell-level warning would repeat for every seed)
WARNED: set[str] = set()


def warn(message: str) -> None:
    """Print a study warning to stderr once per study (``study`` clears the record when it starts)."""
    from tqdm import tqdm

    if message in WARNED:
        return
    WARNED.add(message)
    tqdm.write(f"attnprobe study: warning: {message}", file=sys.stderr)
