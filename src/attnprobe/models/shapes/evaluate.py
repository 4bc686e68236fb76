"""Measure the shapes model against its targets: caption following and heat-map localisation.

``python -m attnprobe.models.shapes evaluate`` runs ``evaluate`` on the shipped model and on the random-weight
baseline and writes ``shapes-eval.json``; docs/shapes-model.md reports its numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..._quiet import quiet_notes
from ..._atomic import write_atomic
from ...analysis import heatmap
from ...capture import probe
from ...capture.passes import check_guidance
from ...errors import ArgumentError
from ..loader import load_pipeline
from . import scenes as shapes
from .model import HELD_OUT, SIZE, build_components
from .scenes import COLOURS, Shape

__all__ = ["caption_following", "match_objects", "localisation_real", "localisation_generated", "evaluate",
           "sample_captions"]


def sample_captions(n: int, seed: int, held_out_only: bool = False, held_out=None):
    """``n`` object lists. ``held_out_only``: every list has at least one held-out colour–shape pair (first)."""

    held_out = HELD_OUT if held_out is None else held_out
    rng = np.random.default_rng(seed)
    lists = []
    while len(lists) < n:
        objects = shapes.sample_objects(rng, held_out=held_out)
        if held_out_only:
            pairs = sorted(held_out)
            colour, shape = pairs[rng.integers(len(pairs))]
            objects = (Shape(colour, shape, objects[0].position),) + objects[1:]
        lists.append(objects)
    return lists


def match_objects(wanted, found) -> list[dict]:
    """Per wanted object, what the image shows of it: the found object of the same colour (the one at the same
    position if several) → ``{"colour": bool, "shape": bool, "position": bool}``; no such colour: all False."""
    rows, left = [], list(found)
    for obj in wanted:
        same = [f for f in left if f.colour == obj.colour]
        if not same:
            rows.append({"colour": False, "shape": False, "position": False})
            continue
        best = next((f for f in same if f.position == obj.position), same[0])
        left.remove(best)
        rows.append({"colour": True, "shape": best.shape == obj.shape, "position": best.position == obj.position})
    return rows


def _images(pipe, captions, seeds, steps, guidance, batch=25):
    out = []
    for i in range(0, len(captions), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        result = pipe(list(captions[i:i + batch]), num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, height=shapes_size(pipe), width=shapes_size(pipe), output_type="np")
        out.append((result.images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def shapes_size(pipe) -> int:
    """The pipeline's native image side in pixels (the UNet's sample size × the VAE's downsampling: 32)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def caption_following(pipe, n: int = 200, seed: int = 1000, steps: int = 20, guidance: float = 4.0,
                      held_out_only: bool = False) -> dict:
    """Generate ``n`` captions (seeded) and read each image back with ``shapes.read_scene``.

    Returns shares in 0–1: ``colour``, ``shape``, ``position`` (per wanted object, see ``match_objects``),
    ``count`` (images with the right number of objects), ``all`` (images entirely right), and ``n``.
    """
    objects = sample_captions(n, seed, held_out_only)
    captions = [shapes.caption(o) for o in objects]
    images = _images(pipe, captions, [seed + i for i in range(n)], steps, guidance)
    per_object, count, whole = [], 0, 0
    for wanted, image in zip(objects, images):
        found = shapes.read_scene(image)
        rows = match_objects(wanted, found)
        per_object += rows
        count += len(found) == len(wanted)
        whole += len(found) == len(wanted) and all(all(r.values()) for r in rows)
    share = lambda key: float(np.mean([r[key] for r in per_object]))  # noqa: E731
    return {"n": n, "colour": share("colour"), "shape": share("shape"), "position": share("position"),
            "count": count / n, "all": whole / n}


def _occurrence(objects, index: int, word: str) -> int:
    """Which mention of ``word`` in the caption belongs to object ``index``."""
    words = [w for o in objects[:index] for w in o.words().split()]
    return words.count(word)


def _scores(heat, mask, other) -> dict:
    row = {"iou": shapes.area_matched_iou(heat, mask), "iou_thr": shapes.threshold_iou(heat, mask),
           "peak": float(shapes.peak_inside(heat, mask)), "mass": shapes.mass_inside(heat, mask),
           "area": float(mask.mean())}  # the object's share of the image: chance for peak and mass
    if other is not None and other.any():
        row["iou_other"] = shapes.area_matched_iou(heat, other)
    return row


def _summarise(rows) -> dict:
    out = {}
    for kind in ("colour", "shape"):
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        out[kind] = {k: float(np.nanmean([r[k] for r in chosen if k in r]))
                     for k in ("iou", "iou_thr", "peak", "mass", "area", "iou_other") if any(k in r for r in chosen)}
        out[kind]["n"] = len(chosen)
    return out


@torch.no_grad()
def localisation_real(pipe, n: int = 60, seed: int = 2000, timesteps=(900, 700, 500, 300, 100)) -> dict:
    """Heat maps of colour and shape words on real scenes noised to each timestep (one denoiser call, conditional,
    all sites, mean over heads; ``attnprobe.heatmap`` at the image size), scored against the generator's masks.

    Returns per timestep and ``"all"``: per word kind (``colour``, ``shape``) the mean area-matched IoU, 0.5
    threshold IoU, peak-on-object share, attention mass inside, and the area-matched IoU against the *other*
    object (``iou_other``, two-object scenes).
    """

    rng = np.random.default_rng(seed)
    scenes = [shapes.render(shapes.sample_objects(rng), size=SIZE, jitter=rng) for _ in range(n)]
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    dtype = pipe.unet.dtype
    z0 = pipe.vae.encode(x.to(dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
    captions = [s.caption for s in scenes]
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    emb = pipe.text_encoder(ids)[0]
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    result, every = {}, []
    for t in timesteps:
        tt = torch.full((n,), t, dtype=torch.long)
        zt = pipe.scheduler.add_noise(z0, noise, tt)
        with probe(pipe, heads="mean", prompts=captions) as store:
            pipe.unet(zt, tt, emb)
        rows = []
        for i, scene in enumerate(scenes):
            for k, obj in enumerate(scene.objects):
                other = scene.masks[1 - k] if len(scene.objects) == 2 else None
                for kind, word in (("colour", obj.colour), ("shape", obj.shape)):
                    heat = heatmap(store, word, sample=i, occurrence=_occurrence(scene.objects, k, word),
                                             size=(SIZE, SIZE)).numpy()
                    rows.append({"kind": kind, **_scores(heat, scene.masks[k], other)})
        result[str(t)] = _summarise(rows)
        every += rows
    result["all"] = _summarise(every)
    return result


def colour_masks(image: np.ndarray, objects) -> list[np.ndarray]:
    """Per wanted object, the pixels of its colour on its half of the image (colour segmentation of a generated
    image; the half keeps two objects of one colour apart)."""
    labels = shapes.nearest_colour(image)
    size_h, size_w = labels.shape
    y, x = np.mgrid[0:size_h, 0:size_w]
    half = {"left": x < size_w / 2, "right": x >= size_w / 2, "top": y < size_h / 2, "bottom": y >= size_h / 2}
    names = list(COLOURS)
    return [(labels == names.index(o.colour)) & half[o.position] for o in objects]


def localisation_generated(pipe, n: int = 60, seed: int = 3000, steps: int = 20, guidance: float = 4.0) -> dict:
    """Heat maps over every denoiser call of generations (conditional pass, all sites), scored against colour
    segmentation of the generated images (objects whose colour is missing are skipped; ``n_scored`` says how
    many words were scored)."""

    objects = sample_captions(n, seed)
    captions = [shapes.caption(o) for o in objects]
    rows = []
    for i, (wanted, cap) in enumerate(zip(objects, captions)):
        with probe(pipe, heads="mean") as store:
            image = _images(pipe, [cap], [seed + i], steps, guidance)[0]
        masks = colour_masks(image, wanted)
        for k, obj in enumerate(wanted):
            if masks[k].sum() < 4:
                continue
            other = masks[1 - k] if len(wanted) == 2 else None
            for kind, word in (("colour", obj.colour), ("shape", obj.shape)):
                heat = heatmap(store, word, occurrence=_occurrence(wanted, k, word), size=(SIZE, SIZE))
                rows.append({"kind": kind, **_scores(heat.numpy(), masks[k], other)})
    out = _summarise(rows)
    out["n_scored"] = len(rows)
    return out


@quiet_notes()
def random_pipeline(seed: int = 0):
    """The shapes model's architecture with random (seeded) weights: the baseline every target is set against."""
    from diffusers import StableDiffusionPipeline


    parts = build_components(seed)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def evaluate(model, out=None, captions: int = 200, scenes: int = 60, generated: int = 40, steps: int = 20,
             guidance: float = 4.0, baseline: bool = True) -> dict:
    """Every target measure for ``model`` (a folder, ``"shapes"`` or a pipeline) and the random-weight baseline;
    written to ``out`` (JSON) when given.

    Raises:
        ArgumentError (a ValueError): a count < 1, a guidance that is not a finite number ≥ 0, or a model that is not a UNet pipeline.
    """
    for name, value in (("captions", captions), ("scenes", scenes), ("generated", generated), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be an integer ≥ 1; got {value!r}")
    check_guidance(guidance)
    pipe = load_pipeline(str(model), dtype=torch.float32) if isinstance(model, (str, Path)) else model
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ArgumentError(f"the evaluation needs a UNet pipeline of the shapes model's kind; {model!r} is a "
                         f"{type(pipe).__name__}")
    pipe.set_progress_bar_config(disable=True)
    result = {"settings": {"captions": captions, "held_out_captions": max(captions // 4, 20),
                           "study_settings_captions": max(captions // 2, 20), "scenes": scenes,
                           "generated": generated, "steps": steps, "guidance": guidance,
                           "scheduler": type(pipe.scheduler).__name__}}
    result["following"] = caption_following(pipe, captions, steps=steps, guidance=guidance)
    result["following_held_out"] = caption_following(pipe, max(captions // 4, 20), seed=5000, steps=steps,
                                                     guidance=guidance, held_out_only=True)
    result["following_study_settings"] = caption_following(pipe, max(captions // 2, 20), seed=7000, steps=10,
                                                           guidance=7.5)  # attnprobe study's defaults
    result["localisation_real"] = localisation_real(pipe, scenes)
    result["localisation_generated"] = localisation_generated(pipe, generated, steps=steps, guidance=guidance)
    if baseline:
        rand = random_pipeline()
        rand.set_progress_bar_config(disable=True)
        result["random"] = {"following": caption_following(rand, 40, steps=steps, guidance=guidance),
                            "localisation_real": localisation_real(rand, scenes)}
    if out is not None:  # written whole or not at all
        write_atomic(Path(out), json.dumps(result, indent=1).encode())
    return result
