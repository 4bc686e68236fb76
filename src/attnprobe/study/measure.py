"""One generation cell of a study, measured: every prompt variant of a concept in one pipeline call from a seed's noise,
then one call of the baseline prompt per intervention row from the same noise, each under a probe; every image
scored for presence. ``measure_cell`` returns the cell's rows and tensors; ``attnprobe.study.run`` writes them.

Per sample: ``mass`` (the concept trajectory summed over every mention, ``attnprobe.trajectory``) and ``mass_last``
(the last mention only, the one that asks for the picture, aligned with the baseline's single mention); per row:
their AUC (``attnprobe.auc``) and Δ vs the baseline of the same seed.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import os
import shutil
import traceback
import typing
from pathlib import Path

import numpy as np
import torch

from ..analysis import auc, concept_positions, heatmap, trajectory
from ..capture import denoiser_of, family_of, probe
from ..errors import ConceptError, ConfigError, NumericalError
from ..interventions import intervene
from ..models.loader import TINY_MODELS, first_line
from ..text.tokens import find_concept, token_layout
from .cells import slug
from .config import check_capture
from .report import warn
from .scorer import checked_scores
from .video import (check_frames, frame_maps, frame_record, frame_stills, is_video, middle_frame,
                    noise as video_noise, video_options)

__all__ = ["measure_cell", "check_prompts", "check_makes_images", "check_size", "size_factor", "default_size",
           "initial_latents", "concept_mass", "failure_row", "browser_maps", "THUMBNAIL", "BROWSER_SIDE",
           "JOINT_SIDE"]

#: The largest side of the images a cell shard keeps for the heat-map figure (pixels).
THUMBNAIL = 128

#: The largest side of the small maps a cell shard keeps for report.html's heat-map browser (``browser_maps``).
BROWSER_SIDE = 32
#: The largest side of its maps of one site at one call (``[site, call, h, w]``: many, so smaller).
JOINT_SIDE = 12



def default_size(pipe, model: str) -> int:
    """The study's default image side (pixels): 32 for the shapes model, 64 for the tiny ones, else the native one."""
    if model == "shapes":
        return 32
    if model in TINY_MODELS:
        return 64
    denoiser = denoiser_of(pipe)
    sample = int(getattr(denoiser.config, "sample_size", 64))
    return sample * spatial_factor(pipe)


def spatial_factor(pipe) -> int:
    """The VAE's spatial downsampling: ``vae_scale_factor`` (image pipelines), ``vae_scale_factor_spatial`` (video
    pipelines: Wan, CogVideoX, HunyuanVideo), ``vae_spatial_compression_ratio`` (LTX); 8 for a pipeline with none."""
    for name in ("vae_scale_factor", "vae_scale_factor_spatial", "vae_spatial_compression_ratio"):
        value = getattr(pipe, name, None)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= 1:
            return int(value)
    return 8


def size_factor(pipe) -> tuple[int, int]:
    """What an image side (pixels) must be a multiple of for this pipeline: ``(vae, patch)``, the VAE's downsampling
    (``vae_scale_factor``; 8 for a pixel-space or MoVQ pipeline without one) and the latent patch (2 for pipelines that
    pack 2×2 latents into tokens, else the denoiser's ``patch_size``)."""
    vae = spatial_factor(pipe)
    patch = getattr(denoiser_of(pipe).config, "patch_size", None) or 1
    patch = max(patch) if isinstance(patch, (tuple, list)) else int(patch)
    return vae, 2 if getattr(pipe, "_pack_latents", None) is not None else patch


def _memory(device) -> int | None:
    """The bytes of memory a device has (CUDA: the card's; CPU: the machine's), or None when unknown."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass
    return None


def check_size(pipe, size: int, images: int) -> None:
    """Refuse an image side (pixels) this loaded pipeline cannot make, before its first generation.

    ``images``: how many images one pipeline call of a cell decodes at once (its variants). The memory estimate is
    the VAE decoder's full-resolution activations: its widest full-resolution block's channels × size² values × the
    VAE's bytes per value × 4 (input, output, norm and residual alive at once) per image (none with VAE tiling, one
    image with VAE slicing); e.g. SD at 4096 px in fp16: 17 GiB per image.

    Raises:
        ConfigError (a ValueError): ``size`` is not a multiple of ``size_factor``'s product (the latent grid would not
            split into the denoiser's patches), or the estimate is over the device's memory (both in the message).
    """
    vae, patch = size_factor(pipe)
    if size % (vae * patch):
        lower = size // (vae * patch) * vae * patch
        near = f"{lower} or {lower + vae * patch}" if lower else str(vae * patch)
        raise ConfigError(f"size {size} is not a multiple of {vae * patch}, this model's factor (its VAE downsamples by "
                          f"{vae}, its denoiser reads {patch}×{patch} latent patches): use {near}")
    decoder = getattr(getattr(pipe, "vae", None), "config", None)
    channels = getattr(decoder, "block_out_channels", None)
    if not channels or getattr(pipe.vae, "use_tiling", False):
        return
    per_image = int(channels[0]) * size * size * pipe.vae.dtype.itemsize * 4
    need = per_image * (1 if getattr(pipe.vae, "use_slicing", False) else max(int(images), 1))
    have = _memory(pipe.vae.device)
    if have is not None and need > have:
        raise ConfigError(f"size {size}: decoding a cell's {images} image(s) needs about {need / 2**30:.0f} GiB (the "
                          f"VAE's {channels[0]} full-resolution channels × {size}² pixels × "
                          f"{pipe.vae.dtype.itemsize} bytes × 4 per image), more than the {have / 2**30:.0f} GiB of "
                          f"{pipe.vae.device}; use a smaller size")


def initial_latents(pipe, seed: int, size: int, copies: int, device, dtype) -> torch.Tensor:
    """A seed's initial noise for a ``size``-pixel image, repeated ``copies`` times (every variant of a cell starts
    from the same latents); packed for Flux-style pipelines (Flux, Qwen-Image: 2×2 latent patches packed into tokens;
    Flux.2: latents patched 2×2 into channels, then flattened into tokens)."""
    channels = denoiser_of(pipe).config.in_channels
    pack = getattr(pipe, "_pack_latents", None)
    patched = pack is not None and len(inspect.signature(pack).parameters) == 1  # Flux.2: _pack_latents(latents)
    channels = channels // 4 if pack is not None and not patched else channels
    side = size // int(getattr(pipe, "vae_scale_factor", 8)) // (2 if patched else 1)
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, channels, side, side), generator=g, dtype=torch.float32)
    if pack is not None and not patched:
        noise = pack(noise, 1, channels, side, side)
    return noise.repeat(copies, *[1] * (noise.ndim - 1)).to(device=device, dtype=dtype)


def guided(pipe, options: dict) -> dict:
    """The call options with the study's guidance applied as the pipeline applies guidance: ``guidance_scale``, or,
    for a pipeline that ignores it (no guidance embedding) but runs true classifier-free guidance (Qwen-Image, and
    Flux without a guidance embedding), ``true_cfg_scale`` too, with an empty negative prompt (``negatives``); for a
    pipeline that guides through its ``guider`` (HunyuanImage: no ``guidance_scale`` argument), the guider's scale is
    set (the study built the pipeline) and the option dropped."""
    params = inspect.signature(type(pipe).__call__).parameters
    embedded = bool(getattr(getattr(denoiser_of(pipe), "config", None), "guidance_embeds", True))
    if "true_cfg_scale" in params and not embedded:
        return {**options, "true_cfg_scale": options["guidance_scale"]}
    if "guidance_scale" not in params and hasattr(getattr(pipe, "guider", None), "guidance_scale"):
        pipe.guider.guidance_scale = options["guidance_scale"]
        return {k: v for k, v in options.items() if k != "guidance_scale"}
    return options


def negatives(options: dict, copies: int) -> dict:
    """``options`` with one empty negative prompt per image where they ask for true classifier-free guidance."""
    return {**options, "negative_prompt": [""] * copies} if "true_cfg_scale" in options else options


def check_makes_images(pipe) -> None:
    """Raise unless the pipeline's output holds images: a cell scores each generation's image and draws its heat map
    over it. Read from the output class its ``__call__`` declares (diffusers' ``BaseOutput`` dataclasses); a pipeline
    that declares none passes.

    Raises:
        ConfigError: the output has no ``images`` (Stable Cascade's prior returns ``image_embeddings`` for its
            decoder); names the pipeline and what it returns.
    """
    try:
        returned = typing.get_type_hints(type(pipe).__call__).get("return")
    except Exception:  # an annotation that does not resolve: nothing declared
        return
    outputs = [c for c in typing.get_args(returned) or (returned,) if isinstance(c, type) and dataclasses.is_dataclass(c)]
    fields = [f.name for c in outputs for f in dataclasses.fields(c)]
    if fields and not {"images", "image", "frames"} & set(fields):  # frames: a video pipeline's (study.video)
        raise ConfigError(
            f"{type(pipe).__name__} returns {', '.join(fields)}, not images, and a study scores and draws each "
            "generation's image: probe it with attnprobe.probe(pipe) instead, or study a pipeline that makes images"
        )


def check_prompts(pipe, concepts, variants) -> None:
    """Every concept must be found (whole words) in every variant's prompt, and no two concepts may be the same tokens
    for every tokenizer of the pipeline ("dog" and "Dog" for CLIP, which lowercases), before anything is generated."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None:
        return
    tokenizers = [t for t in (getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3"))
                  if t is not None]
    seen: dict[tuple, str] = {}
    for concept in concepts:
        ids = tuple(tuple(t(concept, add_special_tokens=False).input_ids) for t in tokenizers)
        if ids in seen:
            case = " (CLIP's lowercases)" if seen[ids].lower() != seen[ids] or concept.lower() != concept else ""
            raise ConfigError(f"concepts {seen[ids]!r} and {concept!r} are the same tokens for this model's "
                              f"tokenizer{'s' if len(tokenizers) > 1 else ''}{case}: one concept would be run and "
                              "counted twice; give it once")
        seen[ids] = concept
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
        raise ConfigError("checking the prompts before generating: " + "; ".join(problems[:5]))
    for name, (prompt, length) in cut.items():
        warn(f"variant {name!r} is {length} tokens ({prompt[:60]!r}…), the model reads {limit}: its end is cut off "
              "(the concept's requested mention is kept)")


def failure_row(model: str, concept: str, seed, exc: BaseException, row: str = "") -> dict:
    """A row of ``failures.csv``: what failed (a cell, or one row of it) and why."""
    return dict(model=model, concept=concept, seed=seed, error=(f"row {row}: " if row else "") + first_line(exc),
                detail=traceback.format_exc(limit=3).replace("\n", " | "))


def check_finite(mass: torch.Tensor, what: str) -> None:
    """Raise unless a trajectory ``mass`` (``[call]``) is finite.

    Raises:
        NumericalError: a NaN or inf value; the message names ``what`` and the first denoiser call that has one.
    """
    bad = (~torch.isfinite(mass)).nonzero().flatten().tolist()
    if bad:
        raise NumericalError(f"non-finite attention for {what} from denoiser call {bad[0]} on (nan or inf latents)")


def measure_cell(pipe, concept, seed, variants, steps, guidance, size, interventions=None, scorer=None,
                  capture=None, maps=None, frames: int | None = None) -> tuple[dict, dict]:
    """One concept and seed: every variant in one pipeline call from the seed's noise, then one call of the baseline
    prompt per intervention row from the same noise, each under a probe; every image scored for presence.

    Returns the cell's record (``trajectories``, ``aucs`` and ``failures`` rows, ``rows``: the row names) and its
    tensors: ``map.<k>`` (heat map of row k, ``[H, W]``), ``image.<k>`` (its image as uint8 RGB, at most
    ``THUMBNAIL`` pixels a side), ``sites.<k>`` (the requested mention's mass ``[call, site]``), and for report.html's
    heat-map browser ``sitemaps.<k>`` ``[site, h, w]`` and ``callmaps.<k>`` ``[call, h, w]`` (``browser_maps``; the
    record's ``map_sites`` names their sites).
    With ``maps`` (a folder), every probe streams its store there (``AttentionStore.load`` reads it back).

    A video pipeline (``frames``: decoded frames per video, ``video.check_frames``) makes videos from one generator
    per video (``video.noise``); ``image.<k>`` is the video's middle decoded frame, the one scored, and ``map.<k>``
    the mean over latent frames; per latent frame, ``framemaps.<k>`` ``[qt, h, w]`` and ``frameimages.<k>`` ``[qt, h,
    w, 3]`` (``video.frame_maps``, ``video.frame_stills``); the record's ``video`` says which frames
    (``video.frame_record``).
    """
    capture = capture or check_capture(None)
    names = list(variants)
    prompts = [variants[v].format(c=concept) for v in names]
    # a one_prompt family (Bria) runs every row alone: a generator per call gives each the same noise, and its latent
    # layout (packing counted in its vae_scale_factor) need not be rebuilt here
    one_prompt = family_of(denoiser_of(pipe)).one_prompt
    video = is_video(pipe)  # its latents' layout is the pipeline's own (5-D, packed…): it draws them
    takes_latents = "latents" in inspect.signature(type(pipe).__call__).parameters and not one_prompt and not video
    latents = initial_latents(pipe, seed, size, len(prompts), pipe.device, denoiser_of(pipe).dtype) if takes_latents \
        else None

    def noise(copies: int) -> dict:  # every row from the seed's noise: the latents, or one generator per image (IF)
        if takes_latents:
            return {"latents": latents[:copies]}
        return video_noise(seed, copies)

    options = guided(pipe, dict(num_inference_steps=int(steps), guidance_scale=float(guidance), height=size,
                                width=size))
    params = inspect.signature(type(pipe).__call__).parameters
    if "use_resolution_binning" in params:
        options["use_resolution_binning"] = False  # PixArt, Sana, HunyuanDiT: the study's size, not their table's
    if "enable_prompt_rewrite" in params:
        options["enable_prompt_rewrite"] = False  # LongCat: the study's prompts, not its text encoder's rewriting
    if video:
        options.update(video_options(pipe, check_frames(pipe, frames, type(pipe).__name__)))

    def made(output) -> list:  # per sample: its image, or its video's frames
        return list(output.frames) if video else list(output.images)

    if maps is not None:
        shutil.rmtree(maps, ignore_errors=True)  # a half-written earlier attempt of this cell

    def recording(p, row: str):
        return probe(p, passes="cond", heads=capture["heads"], dtype=getattr(torch, capture["dtype"]),
                     tokens=concept if capture["tokens"] == "concept" else None,
                     stream_to=None if maps is None else Path(maps) / row)

    # per row: (name, store, sample, prompt, image, intervention, mass factors)
    if one_prompt:  # Bria encodes each prompt alone: one variant per pipeline call
        runs = []
        for i, v in enumerate(names):
            with recording(pipe, f"variant-{slug(v)}") as store:
                generated = pipe(prompt=[prompts[i]], **noise(1), **negatives(options, 1))
            runs.append((v, store, 0, prompts[i], made(generated)[0], "", None))
    else:
        with recording(pipe, "variants") as store:
            generated = pipe(prompt=prompts, **noise(len(prompts)), **negatives(options, len(prompts)))
        runs = [(v, store, i, prompts[i], made(generated)[i], "", None) for i, v in enumerate(names)]
    failures = []
    base = prompts[names.index("baseline")]
    for label, items in (interventions or {}).items():
        try:
            with intervene(pipe, items, base, concept=concept) as run:
                with recording(run.pipe, f"row-{slug(label)}") as st:
                    out = run(**noise(1), **(options if run.negative else negatives(options, 1)))
            factors = run.mass_factors(st, concept)
            check_finite(concept_mass(st, concept, run.conditional_sample(st), "all", factors), f"row {label!r}")
        except Exception as exc:  # one failed row must not lose the cell's others
            failures.append(failure_row("", concept, seed, exc, row=label))
            continue
        runs.append((label, st, run.conditional_sample(st), base, made(out)[0],
                     " + ".join(n["intervention"] for n in run.notes), factors))
    stills = [middle_frame(r[4]) if video else r[4] for r in runs]  # a video's: its middle decoded frame
    presence, accuracy, count = presence_scores(scorer, stills, concept, seed, failures)
    rows, aucs, tensors, shown = [], [], {}, None
    for k, ((variant, st, i, prompt, made_, what, factors), image, p, a, n) in enumerate(
            zip(runs, stills, presence, accuracy, count)):
        mentions = len(st.token_indices(i, concept))
        expected = variants.get(variant, variants["baseline"]).format(c="\0").count("\0")
        if mentions != expected:
            warn(f"{concept!r} occurs {mentions} times in {prompt!r}, its template mentions it {expected} "
                  "times: the template's own words contain it, so 'last mention' may be one of them")
        mass, mass_last = (concept_mass(st, concept, i, occurrence, factors) for occurrence in ("all", -1))
        check_finite(mass, f"variant {variant!r}")
        tensors[f"sites.{k}"] = concept_mass(st, concept, i, -1, factors, by_site=True).float()  # [call, site]
        for call, (m, ml) in enumerate(zip(mass.tolist(), mass_last.tolist())):
            rows.append(dict(concept=concept, variant=variant, seed=seed, prompt=prompt, call=call,
                             timestep=st.calls[call].timestep, mass=m, mass_last=ml))
        aucs.append(dict(concept=concept, variant=variant, seed=seed, prompt=prompt, intervention=what,
                         mentions=mentions, auc=auc(mass), auc_last=auc(mass_last), presence=p, clip_accuracy=a, count=n))
        tensors[f"map.{k}"] = heatmap(st, concept, i, occurrence=-1).float()
        map_sites, tensors[f"sitemaps.{k}"], tensors[f"callmaps.{k}"], tensors[f"sitecalls.{k}"] = browser_maps(
            st, concept, i)
        if video:  # per latent frame: its map, over the decoded frame in the middle of those it shows
            shown = shown or frame_record(st, len(made_))
            tensors[f"framemaps.{k}"] = frame_maps(st, concept, i, tuple(tensors[f"sitemaps.{k}"].shape[-2:]))
            stills_k = frame_stills(made_, shown["spans"])
            if stills_k is not None:
                tensors[f"frameimages.{k}"] = stills_k
        thumb = image.convert("RGB")
        thumb.thumbnail((THUMBNAIL, THUMBNAIL))  # for the heat-map figure: small, so every cell can keep its images
        tensors[f"image.{k}"] = torch.from_numpy(np.asarray(thumb, dtype=np.uint8).copy())
    base_row = next(r for r in aucs if r["variant"] == "baseline")
    for r in aucs:
        for key in ("auc", "auc_last", "presence", "clip_accuracy", "count"):
            r[f"delta_{key}"] = r[key] - base_row[key]
    axes = len(store.grid_dims)  # qh qw, or qt qh qw for a video
    sites = [[s.name, "×".join(map(str, store.maps(s, calls=[0], samples=[0], tokens=[0]).shape[-1 - axes:-1]))]
             for s in store.sites]  # in execution order, with each site's query grid
    record = dict(rows=[r[0] for r in runs], trajectories=rows, aucs=aucs, failures=failures, sites=sites,
                  map_sites=map_sites)
    if shown is not None:
        record["video"] = shown
    return record, tensors


def browser_maps(store, concept, sample, side: int = BROWSER_SIDE,
                 joint_side: int = JOINT_SIDE) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The small maps of report.html's heat-map browser: the requested (last) mention's attention per site and per call.

    Each (site, call) map is the mention's tokens summed and the heads averaged (``[qh, qw]``, as ``heatmap``), resized
    bilinearly (antialiased when it shrinks) to one grid ``[h, w]``: the largest site grid, cut to ``side`` pixels on
    its longer side (the aspect kept). Flat sites (no grid) are left out, as in ``heatmap``; a video's latent frames are
    averaged (each weighs the same, as in ``heatmap(frame=None)``).

    Returns:
        ``(names, per_site, per_call, joint)``: the sites' names in execution order; ``per_site`` ``[site, h, w]`` (each
        site's maps averaged over calls) and ``per_call`` ``[call, h, w]`` (each call's averaged over sites), float16.
        Their means over sites and over calls are the same map: ``heatmap``'s, at this size. ``joint`` ``[site, call,
        h', w']``: every site at every call, float16, cut to ``joint_side`` pixels on its longer side.
    """
    positions = concept_positions(store, concept, sample, occurrence=-1)
    idx = store.sample_index(sample)
    names = [s.name for s in store.sites if s.name not in store.flat_sites]
    grids = {n: tuple(store.maps(n, calls=[0], samples=[idx], tokens=[0]).shape[-3:-1]) for n in names}
    qh, qw = max(grids.values(), key=lambda g: g[0] * g[1])
    scale = min(1.0, side / max(qh, qw))
    shape = (max(1, round(qh * scale)), max(1, round(qw * scale)))
    per_site = []
    for name in names:
        maps = store.maps(name, samples=[idx], tokens=positions).float().sum(-1)  # [call, 1, head, (qt,) qh, qw]
        grid = maps.mean(dim=tuple(range(1, maps.ndim - 2)))[:, None]  # [call, 1, qh, qw]: a video's frames averaged
        shrink = grid.shape[-2] > shape[0] or grid.shape[-1] > shape[1]
        per_site.append(torch.nn.functional.interpolate(grid, size=shape, mode="bilinear", align_corners=False,
                                                        antialias=shrink)[:, 0])  # [call, h, w]
    stack = torch.stack(per_site)  # [site, call, h, w]
    small = min(1.0, joint_side / max(shape))
    joint = stack if small == 1 else torch.nn.functional.interpolate(
        stack.flatten(0, 1)[:, None], size=(max(1, round(shape[0] * small)), max(1, round(shape[1] * small))),
        mode="bilinear", align_corners=False, antialias=True)[:, 0].unflatten(0, stack.shape[:2])
    return names, stack.mean(dim=1).half(), stack.mean(dim=0).half(), joint.half()


def concept_mass(store, concept, sample, occurrence, factors, by_site: bool = False) -> torch.Tensor:
    """The concept trajectory ``[call]`` (``by_site``: ``[call, site]``); with ``renormalize=False`` edits, the
    weights the denoiser used."""
    if factors is None or bool((factors == 1).all()):
        return trajectory(store, concept, sample, occurrence=occurrence, by_site=by_site)
    per_site = trajectory(store, concept, sample, occurrence=occurrence, by_site=True) * factors
    return per_site if by_site else per_site.mean(dim=1)


def presence_scores(scorer, images, concept, seed, failures: list) -> tuple[list[float], list[float], list[float]]:
    """Per image, the scorer's presence score, CLIP accuracy and count of the concept's objects: NaN without a
    scorer, without that method (only the shapes scorer counts), or where it failed (its failure appended to
    ``failures``: the cell keeps its attention rows)."""
    nan = [float("nan")] * len(images)
    if scorer is None:
        return nan, nan, nan
    found = {}
    for method in ("score", "accuracy", "count"):
        if not callable(getattr(scorer, method, None)):
            continue
        try:
            found[method] = checked_scores(scorer, method, images, concept)
        except Exception as exc:  # one failed measure loses only itself
            failures.append(failure_row("", concept, seed, exc, row="presence" if method == "score" else method))
    return found.get("score", nan), found.get("accuracy", nan), found.get("count", nan)
