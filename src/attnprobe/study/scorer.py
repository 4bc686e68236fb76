"""Concept presence in generated images: does the picture still show the concept?

    >>> import torch
    >>> from attnprobe.study.scorer import load_scorer
    >>> scorer = load_scorer("tiny")                   # random weights: plumbing, not meaning
    >>> images = torch.rand(2, 3, 64, 64)              # [image, channel, H, W] in [0, 1]; PIL images work too
    >>> presence = scorer.score(images, "dog")         # [image], CLIPScore in [0, 2.5]
    >>> presence.shape, bool(((presence >= 0) & (presence <= 2.5)).all())
    (torch.Size([2]), True)
    >>> scorer.accuracy(images, "dog").unique().tolist() in ([0.0], [1.0], [0.0, 1.0])   # [image], 1 or 0
    True

A scorer is any object with a ``name`` and ``score(images, concept) -> [image]`` (``PresenceScorer``); the study
scores every generated image and writes the score and its Δ vs the baseline image of the same seed, next to the
attention Δ. ``CLIPScorer`` gives two measures from one CLIP model (image and text embeddings, cosine ``cos``):

- **CLIPScore** (Hessel et al. 2021, EMNLP): ``w · max(cos(image, target text), 0)`` with ``w = 2.5``; in
  ``[0, 2.5]``, higher = the image matches the concept's text more. The target text is ``"a picture of {c}"``
  (the study's baseline prompt); the paper's own prefix is "A photo depicts".
- **CLIP accuracy** (Kumari et al. 2023, ICCV, "Ablating Concepts in Text-to-Image Diffusion Models"): per image,
  1 when it is closer to the target text than to an anchor text (``"a picture"``), else 0; its mean over
  images is the share of images CLIP still classifies as the concept.

Real scores need real weights: ``load_scorer("openai/clip-vit-large-patch14")`` (the CLIP of SD 1.x's text
encoder) on a machine that has them. ``load_scorer("tiny")`` builds a random-weight CLIP offline
(``attnprobe.models.tiny.tiny_clip``), to run the plumbing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ..errors import ArgumentError, ArgumentTypeError, ConfigError, ModelLoadError, ScorerError
from ..models.loader import first_line
from ..models.shapes.scenes import COLOURS, POSITIONS, SHAPES, read_scene
from ..models.tiny import tiny_clip

__all__ = ["PresenceScorer", "CLIPScorer", "ShapesScorer", "load_scorer", "CLIPSCORE_W", "checked_range", "checked_scores"]

#: CLIPScore's rescaling weight (Hessel et al. 2021).
CLIPSCORE_W = 2.5


@runtime_checkable
class PresenceScorer(Protocol):
    """What the study needs of a presence scorer.

    Attributes:
        name: how the scores are labelled in the outputs (e.g. ``"openai/clip-vit-large-patch14"``).
        score_range: optional ``(low, high)``, the values ``score`` can return; the study clips its Δ presence
            intervals to ``±(high − low)`` when a scorer has it.
    """

    name: str

    def score(self, images, concept: str) -> torch.Tensor:
        """One float per image (``[image]``): how much of ``concept`` each image shows (higher = more)."""
        ...


def _pil_images(images) -> list:
    """PIL images from a PIL image, a list of them, ``[image, 3, H, W]`` / ``[3, H, W]`` tensors in ``[0, 1]`` (or uint8), or
    ``[image, H, W, 3]`` / ``[H, W, 3]`` arrays (floats in ``[0, 1]`` or uint8).

    Raises:
        ArgumentError (a ValueError): another shape, or floats outside ``[0, 1]`` (by more than 0.01).
        ArgumentTypeError (a TypeError): another type.
    """
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, torch.Tensor):
        array = images.detach().cpu()
        array = array if array.dtype == torch.uint8 else array.float()  # uint8: 0–255 pixels, kept as they are
        array = array.unsqueeze(0) if array.ndim == 3 else array
        if array.ndim != 4 or array.shape[1] not in (1, 3):
            raise ArgumentError(f"image tensors must be [image, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
        images = array.permute(0, 2, 3, 1).numpy()
    if isinstance(images, np.ndarray):
        array = images[None] if images.ndim == 3 else images
        if array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise ArgumentError(f"image arrays must be [image, H, W, 3]; got shape {images.shape}")
        if array.dtype != np.uint8:
            low, high = float(np.nanmin(array)), float(np.nanmax(array))
            if low < -0.01 or high > 1.01:  # 0–255 floats or −1..1 decoder output would be clipped to white/black
                raise ArgumentError(f"float images must be in [0, 1]; got values from {low:g} to {high:g} (pass uint8 for "
                                 "0–255 pixels, or (x + 1) / 2 for −1..1)")
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in array]
    if isinstance(images, Sequence) and images and all(isinstance(i, Image.Image) for i in images):
        return list(images)
    raise ArgumentTypeError(f"images must be PIL images, a [image, 3, H, W] tensor or [image, H, W, 3] array; got "
                    f"{type(images).__name__}")


class CLIPScorer:
    """CLIPScore and CLIP accuracy of images against a concept (see the module doc for both measures).

    Args:
        model: a ``transformers.CLIPModel``. processor: its ``CLIPProcessor``.
        name: the label in outputs. Default ``"clip"``.
        target: the concept's text, ``{c}`` standing for the concept. Default ``"a picture of {c}"``.
        anchor: CLIP accuracy's anchor text. Default ``"a picture"``.
        random_weights: the model has random weights (its scores are plumbing). Default False.

    Examples:
        >>> from attnprobe.testing import tiny_clip
        >>> scorer = CLIPScorer(*tiny_clip(), name="tiny")
        >>> scorer.similarity(torch.rand(3, 3, 32, 32), ["a picture of dog", "a picture"]).shape   # [image, text]
        torch.Size([3, 2])
    """

    def __init__(self, model, processor, *, name: str = "clip", target: str = "a picture of {c}",
                 anchor: str = "a picture", random_weights: bool = False) -> None:
        if "{c}" not in target:
            raise ArgumentError(f"target={target!r} has no {{c}} for the concept")
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.score_range = (0.0, CLIPSCORE_W)
        self.target = target
        self.anchor = anchor
        self.random_weights = random_weights

    def __repr__(self) -> str:
        return f"CLIPScorer(name={self.name!r}, target={self.target!r}, anchor={self.anchor!r})"

    @torch.no_grad()
    def similarity(self, images, texts: Sequence[str]) -> torch.Tensor:
        """Cosine of each image's CLIP embedding to each text's: float32 ``[image, text]`` in ``[-1, 1]``."""
        device = next(self.model.parameters()).device
        inputs = self.processor(text=list(texts), images=_pil_images(images), return_tensors="pt", padding=True)
        out = self.model(**{k: v.to(device) for k, v in inputs.items()})
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (image @ text.T).cpu()

    def score(self, images, concept: str) -> torch.Tensor:
        """CLIPScore, ``2.5 · max(cos(image, target), 0)``: float32 ``[image]`` in ``[0, 2.5]``."""
        return CLIPSCORE_W * self.similarity(images, [self.target.format(c=concept)])[:, 0].clamp(min=0)

    def accuracy(self, images, concept: str) -> torch.Tensor:
        """CLIP accuracy per image: 1.0 where ``cos(image, target) > cos(image, anchor)``, else 0.0 (``[image]``)."""
        sim = self.similarity(images, [self.target.format(c=concept), self.anchor])
        return (sim[:, 0] > sim[:, 1]).float()


class ShapesScorer:
    """Concept presence for the shapes model, read programmatically (``attnprobe.models.shapes.scenes.read_scene``): 1.0 when
    the image shows an object with every colour / shape / position word of the concept (``"red circle"``,
    ``"circle"``, ``"blue square on the left"``), else 0.0. Exact where the checker is (scenes of the generator read
    back 300 / 300); no learned model, so the score of an image is not itself a model's opinion.

        >>> from attnprobe.models.shapes.scenes import Shape, render
        >>> image = render([Shape("red", "circle", "left")]).image
        >>> ShapesScorer().score(image, "red circle").tolist(), ShapesScorer().score(image, "blue circle").tolist()
        ([1.0], [0.0])
    """

    name = "shapes (programmatic checker)"
    score_range = (0.0, 1.0)

    def score(self, images, concept: str) -> torch.Tensor:
        """1.0 / 0.0 per image (``[image]`` float32): does it show an object matching every word of ``concept``?

        Raises:
            ConfigError (a ValueError): ``concept`` names no colour, shape or position of the shapes model.
        """
        return (self.count(images, concept) > 0).float()

    def count(self, images, concept: str) -> torch.Tensor:
        """How many objects matching every word of ``concept`` each image shows (``[image]`` float32, whole numbers):
        an instruction that names the concept twice may make the model draw it twice, which presence cannot see.

            >>> from attnprobe.models.shapes.scenes import Shape, render
            >>> two = render([Shape("red", "circle", "left"), Shape("red", "circle", "right")]).image
            >>> ShapesScorer().count(two, "red circle").tolist()
            [2.0]

        Raises:
            ConfigError (a ValueError): ``concept`` names no colour, shape or position of the shapes model.
        """
        wanted = self._wanted(concept)
        counts = []
        for image in _pil_images(images):
            found = read_scene(np.asarray(image.convert("RGB")))
            counts.append(float(sum(all(getattr(obj, key) in values for key, values in wanted.items() if values)
                                    for obj in found)))
        return torch.tensor(counts, dtype=torch.float32)

    @staticmethod
    def _wanted(concept: str) -> dict:
        words = str(concept).lower().split()
        wanted = {"colour": [w for w in words if w in COLOURS], "shape": [w for w in words if w in SHAPES],
                  "position": [w for w in words if w in POSITIONS]}
        unknown = [w for w in words if w not in (*COLOURS, *SHAPES, *POSITIONS, "a", "an", "the", "on")]
        if unknown:
            raise ConfigError(f"concept {concept!r}: the shapes scorer does not know {unknown} (colours {list(COLOURS)}, "
                             f"shapes {list(SHAPES)}, positions {list(POSITIONS)}; or use --scorer none)")
        if not any(wanted.values()):
            raise ConfigError(f"concept {concept!r} names no colour {list(COLOURS)}, shape {list(SHAPES)} or "
                             f"position {list(POSITIONS)}: the shapes scorer cannot read it (use such a concept, "
                             "or --scorer none)")
        return wanted

    def check_concepts(self, concepts) -> None:
        """Raise ``ConfigError`` (before a study generates) for a concept the checker cannot read."""
        for concept in concepts:
            self._wanted(concept)

    def accuracy(self, images, concept: str) -> torch.Tensor:
        """The same 1.0 / 0.0 per image (the share of images that still show the concept, averaged): the study's
        ``clip_accuracy`` column holds it under this scorer."""
        return self.score(images, concept)


def scorer_label(scorer) -> str:
    """The name a scorer is reported under (its ``name``, else its class name)."""
    return str(getattr(scorer, "name", type(scorer).__name__))


def scorer_kind(scorer) -> str | None:
    """``"shapes"``, ``"clip"`` or ``"custom"`` (a user's object): how the study describes its presence scores."""
    if scorer is None:
        return None
    return "shapes" if isinstance(scorer, ShapesScorer) else "clip" if isinstance(scorer, CLIPScorer) else "custom"


def checked_range(scorer) -> tuple[float, float] | None:
    """A scorer's optional ``score_range`` as two floats ``(low, high)``, checked before any image is made.

    Raises:
        ScorerError (a ValueError): not two finite real numbers with low < high (text, one number, NaN…), naming the scorer.
    """
    import numbers

    value = getattr(scorer, "score_range", None)
    if value is None:
        return None
    try:
        items = list(value.tolist() if hasattr(value, "tolist") else value)
        ok = len(items) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in items)
        low, high = (float(v) for v in items) if ok else (0.0, 0.0)
        ok = ok and math.isfinite(low) and math.isfinite(high) and low < high
    except TypeError:
        ok = False
    if not ok:
        raise ScorerError(f"scorer {scorer_label(scorer)!r} has score_range={value!r}: it must be (low, high), two "
                         "finite numbers with low < high, or None")
    return low, high


def checked_scores(scorer, method: str, images, concept) -> list[float]:
    """One float per image from ``scorer.<method>``, checked: ``[image]`` real values, finite or NaN, inside the
    scorer's ``score_range`` (``score``), ``[0, 1]`` (``accuracy``) or ≥ 0 (``count``).

    Raises:
        ScorerError (a ValueError): another shape or count, a non-real or infinite value, or a value outside the range.
    """
    values = getattr(scorer, method)(images, concept)
    label = f"scorer {scorer_label(scorer)!r}: {method}()"
    try:
        raw = torch.as_tensor(values)
        scores = None if raw.is_complex() else raw.to(torch.float64)
        problem = "complex values"
    except (TypeError, ValueError, RuntimeError) as exc:
        scores, problem = None, str(exc)
    if scores is None:
        raise ScorerError(f"{label} returned {type(values).__name__}, not real numbers ({problem})")
    if scores.shape != (len(images),):
        raise ScorerError(f"{label} returned shape {list(scores.shape)} for {len(images)} images; it must return "
                         f"one value per image ([{len(images)}])")
    if scores.isinf().any():
        raise ScorerError(f"{label} returned an infinite value ({scores.tolist()}); give NaN for 'no score'")
    bounds = checked_range(scorer) if method == "score" else (0.0, float("inf")) if method == "count" else (0.0, 1.0)
    if bounds is not None:
        low, high = bounds
        outside = scores[~scores.isnan() & ((scores < low) | (scores > high))]
        if outside.numel():
            raise ScorerError(f"{label} returned {outside[0].item():g}, outside its range [{low:g}, {high:g}]")
    return scores.tolist()


def load_scorer(name: str | None = "tiny", device="cpu") -> CLIPScorer | None:
    """A presence scorer by name.

    Args:
        name: ``"tiny"`` (random-weight CLIP built offline), ``"shapes"`` (``ShapesScorer``: the shapes model's
            programmatic checker), ``"none"`` / ``None`` (no scorer), or a hub id / local
            folder of a CLIP model (``CLIPModel`` + its processor), e.g. ``"openai/clip-vit-large-patch14"``.
            Default ``"tiny"``.
        device: where the model runs. Default ``"cpu"``.

    Returns:
        A ``CLIPScorer``, a ``ShapesScorer`` for ``"shapes"``, or None for ``"none"``.

    Raises:
        ModelLoadError: the model could not be loaded (offline, unknown id, not a CLIP model), in one line.
        ArgumentTypeError (a TypeError): neither a name nor a scorer object (says what it lacks).
    """
    if not (name is None or isinstance(name, str)):
        missing = [a for a in ("name", "score") if not hasattr(name, a)]
        raise ArgumentTypeError(f"scorer must be a name or an object with a name and score(images, concept); got "
                        f"{type(name).__name__}" + (f" (it has no {' or '.join(missing)})" if missing else ""))
    if name is None or name == "none":
        return None
    if name == "shapes":
        return ShapesScorer()
    if name == "tiny":
        model, processor = tiny_clip()
        return CLIPScorer(model.to(device), processor, name="tiny-clip (random weights)", random_weights=True)
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as transformers_logging

    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 2)[-1]
    if looks_local and not Path(name).expanduser().exists():
        raise ModelLoadError(f"could not load scorer {name!r}: no such folder (and it is not a hub id)")
    from huggingface_hub.utils import logging as hub_logging

    level, hub_level = transformers_logging.get_verbosity(), hub_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # offline, the hub client logs every retry before the error
    try:
        model = CLIPModel.from_pretrained(name)
        processor = CLIPProcessor.from_pretrained(name)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load scorer {name!r} ({first_line(exc)}). Real presence scores need a CLIP model's weights "
            "on this machine (a local folder or the hub cache) or network access; offline, use --scorer tiny "
            "(random weights) or --scorer none."
        ) from None
    finally:
        transformers_logging.set_verbosity(level)
        hub_logging.set_verbosity(hub_level)
    return CLIPScorer(model.to(device), processor, name=name)
