"""What attnprobe does with each pipeline of the installed diffusers: the coverage table of docs/pipelines.md.

    >>> rows = pipeline_verdicts()
    >>> next(r for r in rows if r.pipeline == "StableDiffusionPanoramaPipeline").verdict
    'refused: runs one denoiser call per view of the panorama at every step'

Two parts, both computed, never written by hand:

- ``pipeline_verdicts()``: every text-conditioned ``DiffusionPipeline`` class diffusers exports, with its denoiser class
  (from its ``__init__`` annotations), the attnprobe family that covers that class, and a verdict: ``tested`` (a tiny
  pipeline of that class runs in the test suite), ``refused …`` (``capture.passes.REFUSED``: the probe raises before
  its first denoiser call; ``capture.families.REFUSED_FAMILIES``, video, audio and priors, and every denoiser no family
  covers: before the pipeline runs) or ``family …, untested`` (a family's tested path; no test of that pipeline).
- ``measure(name)``: what the tests measure on a tiny pipeline (``attnprobe.testing.tiny_pipeline``): sites and their
  kinds, text encoders, whether images are bit-identical with the probe on in fp32 and bf16, and whether a concept's
  token positions are found.

``python tools/pipelines_table.py`` writes docs/pipelines.md from both; a test checks that the page is current.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass

import torch

from ..capture import probe
from ..capture.families import FAMILIES, GENERIC, REFUSED_FAMILIES, animatediff, family_of, kandinsky5
from ..capture.passes import REFUSED
from ..capture.relations import FAMILIES as RELATION_FAMILIES, RELATIONS
from ..errors import ProbeError
from ..capture.sites import DENOISER_ATTRS, denoiser_of
from .tiny import TINY_PIPELINES, tiny_pipeline
from .tiny_video import tiny_hunyuanvideo_template

__all__ = ["Verdict", "pipeline_verdicts", "measure", "render_page", "TESTED"]

#: the text-encoder arguments that make a pipeline text-conditioned
_TEXT_ARGS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


@dataclass(frozen=True)
class Verdict:
    """One pipeline class: ``pipeline``, its ``denoiser`` class name, the ``family`` that covers it (``"generic"``
    for none) and ``verdict``."""

    pipeline: str
    denoiser: str
    family: str
    verdict: str


#: pipeline classes the test suite runs: the tiny pipeline it builds (``attnprobe.testing.tiny_pipeline``; ``None``:
#: built in the test from a tiny pipeline's components) and the test file
TESTED: dict[str, tuple[str | None, str]] = {
    "StableDiffusionPipeline": ("sd", "tests/test_probe.py"),
    "StableDiffusionXLPipeline": ("sdxl", "tests/test_probe.py"),
    "StableDiffusion3Pipeline": ("sd3", "tests/test_joint.py"),
    "FluxPipeline": ("flux", "tests/test_joint.py"),
    "FluxKontextPipeline": (None, "tests/test_joint.py"),
    "ChromaPipeline": ("chroma", "tests/test_joint.py"),
    "PixArtAlphaPipeline": ("pixart", "tests/test_joint.py"),
    "PixArtSigmaPipeline": ("pixart-sigma", "tests/test_joint.py"),
    "SanaPipeline": ("sana", "tests/test_families.py"),
    "QwenImagePipeline": ("qwen", "tests/test_families.py"),
    "Flux2KleinPipeline": ("flux2", "tests/test_families.py"),
    "Flux2Pipeline": ("flux2-dev", "tests/test_families.py"),
    "CogView4Pipeline": ("cogview4", "tests/test_families.py"),
    "KolorsPipeline": ("kolors", "tests/test_families.py"),
    "IFPipeline": ("if", "tests/test_families.py"),
    "HunyuanDiTPipeline": ("hunyuandit", "tests/test_families.py"),
    "AuraFlowPipeline": ("auraflow", "tests/test_families.py"),
    "Lumina2Pipeline": ("lumina2", "tests/test_families.py"),
    "ZImagePipeline": ("zimage", "tests/test_more_families.py"),
    "Kandinsky3Pipeline": ("kandinsky3", "tests/test_more_families.py"),
    "HiDreamImagePipeline": ("hidream", "tests/test_more_families.py"),
    "HunyuanImagePipeline": ("hunyuanimage", "tests/test_more_families.py"),
    "StableCascadePriorPipeline": ("cascade-prior", "tests/test_more_families.py"),
    "CogView3PlusPipeline": ("cogview3", "tests/test_more_families.py"),
    "LuminaPipeline": ("lumina-next", "tests/test_more_families.py"),
    "BriaPipeline": ("bria", "tests/test_more_families.py"),
    "OvisImagePipeline": ("ovis", "tests/test_more_families.py"),
    "PRXPipeline": ("prx", "tests/test_new_families.py"),
    "LongCatImagePipeline": ("longcat", "tests/test_longcat.py"),
    "WanPipeline": ("wan", "tests/test_video.py, tests/test_video_wan22.py"),
    "SkyReelsV2Pipeline": ("skyreels-v2", "tests/test_video.py"),
    "CogVideoXPipeline": ("cogvideox", "tests/test_video.py"),
    "HunyuanVideoPipeline": ("hunyuanvideo", "tests/test_hunyuanvideo.py"),
    "LTXPipeline": ("ltx", "tests/test_video_ltx.py"),
    "AllegroPipeline": ("allegro", "tests/test_video_allegro.py"),
    "SanaVideoPipeline": ("sana-video", "tests/test_video_sana_video.py"),
    "MochiPipeline": ("mochi", "tests/test_video_mochi.py"),
    "HunyuanVideo15Pipeline": ("hunyuanvideo-1.5", "tests/test_video_hunyuanvideo15.py"),
    "Kandinsky5T2VPipeline": ("kandinsky5", "tests/test_video_kandinsky5.py"),
    "AnimateDiffPipeline": ("animatediff", "tests/test_video_animatediff.py"),
    "StableDiffusionPAGPipeline": (None, "tests/test_passes.py"),
    "StableDiffusionInstructPix2PixPipeline": (None, "tests/test_passes.py"),
    "StableDiffusionPipelineSafe": (None, "tests/test_passes.py"),
}


#: tiny pipelines of a class ``TESTED`` lists under another tiny (``wan2.2``: WanPipeline with its two experts)
MORE_TINY: dict[str, tuple[str, str]] = {"wan2.2": ("WanPipeline", "tests/test_video_wan22.py")}

#: pipeline classes a test shows refused at their first denoiser call (not by name: by what the probe sees)
REFUSED_AT_RUN: dict[str, str] = {}
#: pipeline classes of a recorded denoiser that its family refuses by name (``Family.pipe_refused``), with why
REFUSED_BY_FAMILY: dict[str, str] = {**kandinsky5.REFUSED_PIPELINES, **animatediff.REFUSED_PIPELINES}


def _denoiser(cls) -> tuple[str, tuple[type, ...]] | None:
    """The denoiser class name(s) in a pipeline's ``__init__`` annotation, and the diffusers classes they name."""
    import diffusers

    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return None
    for arg in DENOISER_ATTRS:  # the denoiser argument of its __init__, looked for as probe looks
        if arg in params:
            note = params[arg].annotation
            text = note if isinstance(note, str) else getattr(note, "__name__", None) or str(note)
            names = [part.strip().rsplit(".", 1)[-1] for part in text.replace("Optional[", "").strip("]").split("|")]
            names = [n for n in names if n and n != "None"]
            classes = tuple(c for c in (getattr(diffusers, n, None) for n in names) if isinstance(c, type))
            return " | ".join(names), classes
    return None


def pipeline_verdicts() -> list[Verdict]:
    """Every text-conditioned pipeline class of the installed diffusers with what attnprobe does with it, sorted by
    name (see the module docstring for the verdicts)."""
    import diffusers

    out = []
    for name in sorted(n for n in dir(diffusers) if "Pipeline" in n):
        try:
            cls = getattr(diffusers, name)
        except Exception:  # a pipeline whose optional dependency is missing
            continue
        if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
            continue
        found = _denoiser(cls)
        params = inspect.signature(cls.__init__).parameters
        if found is None or not any(arg in params for arg in _TEXT_ARGS):
            continue  # no denoiser, or not text-conditioned: nothing to probe for text attention
        denoiser, classes = found
        known = REFUSED_FAMILIES + FAMILIES
        family = next((f for f in known if f.matches is not None and name.startswith(f.pipelines)
                       and any(issubclass(c, f.classes()) for c in classes)), None)
        family = family or next((f for f in known if f.matches is None
                                 and any(issubclass(c, f.classes()) for c in classes)), GENERIC)
        refused = next((c.__name__ for c in cls.__mro__ if c.__name__ in REFUSED), None)
        if family.refused:
            verdict = f"refused: {family.title}: {family.refused}"
        elif refused is not None:
            when, why = REFUSED[refused]
            verdict = f"refused: {why}" + (f" (only when `{when}` is set)" if when else "")
        elif name in REFUSED_AT_RUN or name in REFUSED_BY_FAMILY:
            verdict = f"refused: {REFUSED_AT_RUN.get(name) or REFUSED_BY_FAMILY[name]}"
        elif name in TESTED:
            verdict = f"tested ({TESTED[name][1]})"
        elif family is not GENERIC:
            verdict = f"family {family.name}, untested"
        else:
            verdict = "refused: no family covers its denoiser (`allow_generic=True` records it by structure, unchecked)"
        out.append(Verdict(name, denoiser, family.name, verdict))
    return out


def measure(name: str) -> dict:
    """What the tests measure on the tiny pipeline ``name`` (``attnprobe.testing.tiny_pipeline``): ``pipeline``,
    ``sites`` (count), ``kinds`` (``{"cross": n, …}``), ``encoders`` (the text encoders whose positions are the keys,
    by class), ``bit_identical`` (``{"fp32": bool, "bf16": bool}``: images with the probe on equal those without, bit
    for bit), ``concept_found`` (the positions of "dog" in the conditional sample's prompt), ``relations`` (those a
    probe records on it with ``relations=``, in ``RELATIONS`` order; empty outside ``relations.FAMILIES``)."""
    out: dict = {"bit_identical": {}}
    out["relations"] = []
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        pipe = tiny_pipeline(name, dtype=dtype)
        denoiser = denoiser_of(pipe)
        kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="latent")
        params = inspect.signature(type(pipe).__call__).parameters
        kwargs.update({k: v for k, v in (("max_sequence_length", 16), ("use_resolution_binning", False),
                                         ("clean_caption", False), ("enable_prompt_rewrite", False),
                                         ("num_frames", 9), ("frames", 9)) if k in params})  # video: 3 latent frames
        kwargs["output_type"] = "latent" if hasattr(pipe, "vae") else "pt"  # DeepFloyd IF: pixel space
        if name in ("lumina2", "flux2-dev"):  # their system prompts alone take 30 to 40 positions
            kwargs["max_sequence_length"] = 64
        if name == "hunyuanvideo":  # the default template's crop_start counts the real Llama tokenizer's tokens
            kwargs["prompt_template"] = tiny_hunyuanvideo_template()
        # the output's first field: images, or the image embeddings of a prior (Stable Cascade's)
        run = lambda: pipe(prompt="a picture of dog", generator=torch.Generator().manual_seed(0), **kwargs)[0]
        plain = run()
        with probe(pipe) as store:
            probed = run()
        out["bit_identical"][label] = bool(torch.equal(plain, probed))
        if label == "fp32":
            family = family_of(denoiser)
            out.update(
                pipeline=type(pipe).__name__,
                family=family.name,
                sites=len(store.sites),
                kinds=dict(Counter(s.kind for s in store.sites)),
                encoders=[type(getattr(pipe, enc)).__name__ for enc, _ in family.text_streams(pipe)],
                concept_found=bool(store.token_indices(store.samples[0].index, "dog")),
            )
            if family.name in RELATION_FAMILIES and family.video is None:
                out["relations"] = _relations(pipe, run)
    return out


def _relations(pipe, run) -> list[str]:
    """The relations a probe records on ``pipe`` (``probe(relations=...)``): every one, else image->image alone (a
    UNet's sites have no text queries; Chroma's masked text queries are refused)."""
    for relations in (RELATIONS, ("image->image",)):
        try:
            with probe(pipe, relations=relations, points=(0.5, 0.5)) as store:
                run()
        except ProbeError:
            continue
        return [r for r in RELATIONS if r in store.relations]
    return []


def render_page() -> str:
    """docs/pipelines.md: the measured tiny pipelines, then every text-conditioned pipeline with its verdict."""
    import diffusers

    lines = [
        "# Supported pipelines",
        "",
        "Written by `tools/pipelines_table.py` from `attnprobe.models.coverage` (a test fails when it is stale): do "
        f"not edit by hand. diffusers {diffusers.__version__}.",
        "",
        "## Measured on tiny pipelines",
        "",
        "Each row is measured on the tiny pipeline of `attnprobe.testing.tiny_pipeline(name)` (real diffusers classes, "
        "seeded weights, no downloads): its sites and their kinds, the text encoders whose positions are the keys, "
        "images bit-identical with the probe on, the token positions of a concept found in the prompt, and the "
        "relations a probe records beside the image→text maps (`probe(relations=...)`; `tests/test_relations.py` "
        "checks them on `sd`, `pixart`, `sd3`, `flux`, `chroma`, `qwen`, `flux2` and `cogview4` against a float64 "
        "reference). The test files hold the rest: "
        "maps against an independent reference, pass labels, grids.",
        "",
        "| tiny | pipeline | family | sites (kinds) | token labels from | bit-identical fp32 / bf16 | concept found | "
        "relations | tests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_tiny = {tiny: (cls, where) for cls, (tiny, where) in TESTED.items() if tiny}
    by_tiny.update(MORE_TINY)
    for name in TINY_PIPELINES:
        m = measure(name)
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(m["kinds"].items()))
        same = " / ".join("yes" if m["bit_identical"][d] else "**no**" for d in ("fp32", "bf16"))
        lines.append(f"| `{name}` | `{m['pipeline']}` | {m['family']} | {m['sites']} ({kinds}) | "
                     f"{', '.join(m['encoders'])} | {same} | {'yes' if m['concept_found'] else '**no**'} | "
                     f"{', '.join(m['relations']) or '—'} | `{by_tiny.get(name, (None, '—'))[1]}` |")
    rows = pipeline_verdicts()
    counts = Counter(r.verdict.split(" (")[0].split(":")[0].split(",")[0] for r in rows)
    lines += [
        "",
        f"## Every text-conditioned pipeline of diffusers {diffusers.__version__}",
        "",
        f"{len(rows)} pipeline classes with a denoiser and a text encoder: "
        + ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda kv: -kv[1])) + ". "
        "*tested*: a test runs that pipeline class. *refused*: the probe raises before the first denoiser call, naming "
        "the pipeline (its batch or calls are not what attnprobe labels; a refusal that names an option applies only "
        "when it is set). *family …, untested*: its denoiser class is one a tested pipeline uses, so sites, q/k and "
        "token labels follow a tested path; its own batch recipe is not tested. A denoiser no family covers is refused "
        "unless `probe(..., allow_generic=True)`: then its sites are found by structure alone, its text keys labelled "
        "by the generic rules, and nothing of it is checked against a reference (a warning says so). In every case labels are checked against what each row was conditioned on (rows that contradict "
        "their label are `unknown`, with a warning) and each site's output against its recorded attention once.",
        "",
        "**Your pipeline untested?** `attnprobe sites --model <id>` lists what would be recorded; probe one short "
        "generation and read `store.meta[\"row_evidence\"]` (`encode_prompt` is the strongest), "
        "`store.meta[\"processor_check\"]` (every site `equal`), `store.samples` and `store.tokens(i)`, and heed every "
        "`AttnprobeWarning`. **Refused?** The message names the option to turn off or the base pipeline to probe.",
        "",
        "| pipeline | denoiser | family | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{r.pipeline}` | `{r.denoiser}` | {r.family} | {r.verdict} |" for r in rows]
    lines += ["", "What a site is for each transformer family, the `exact` and `renorm` maps of joint attention, "
              "token layouts, grids and memory: [Transformer denoisers](transformers.md). Row labels, refusals and "
              "the evidence they are checked against: [Concepts](concepts.md).", ""]
    return "\n".join(lines)
