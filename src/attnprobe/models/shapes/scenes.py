"""Scenes of coloured shapes with ground truth: a procedural generator, a programmatic checker and heat-map scores.

The data of attnprobe's small trained model (``attnprobe.models.shapes.model``). A scene holds one or two objects —
circle / square / triangle × red / green / blue, on the left / right / top / bottom — drawn on a grey background
without anti-aliasing, so each object's mask is exactly the pixels it painted (the later object wins where two
overlap; positions of a pair are opposite sides, so they do not).

    >>> import numpy as np
    >>> scene = render([Shape("red", "circle", "left"), Shape("blue", "square", "right")], size=32)
    >>> scene.caption
    'a red circle on the left and a blue square on the right'
    >>> scene.image.shape, scene.masks.shape, scene.masks.dtype
    ((32, 32, 3), (2, 32, 32), dtype('bool'))
    >>> [(s.colour, s.shape, s.position) for s in read_scene(scene.image)]
    [('red', 'circle', 'left'), ('blue', 'square', 'right')]

Heat-map scores (``area_matched_iou``, ``threshold_iou``, ``peak_inside``, ``mass_inside``) compare an
``attnprobe.heatmap`` ``[H, W]`` with an object's mask ``[H, W]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

from ...errors import ArgumentError, ArgumentTypeError

__all__ = [
    "COLOURS", "SHAPES", "POSITIONS", "Shape", "Scene", "render", "caption", "sample_objects", "read_scene",
    "area_matched_iou", "threshold_iou", "peak_inside", "mass_inside",
]

#: RGB of each colour word (uint8), far apart so that colour segmentation of generated images is unambiguous.
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
BACKGROUND = (128, 128, 128)
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# object centre as fractions of the side (x, y); radius as a fraction of the side
_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
_RADIUS = 0.19
# filled share of the bounding box, per shape (circle π/4, square 1, triangle 1/2): the checker's shape cue
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclass(frozen=True)
class Shape:
    """One object of a scene: ``colour`` in ``COLOURS``, ``shape`` in ``SHAPES``, ``position`` in ``POSITIONS``."""

    colour: str
    shape: str
    position: str

    def __post_init__(self):
        for value, allowed, what in ((self.colour, COLOURS, "colour"), (self.shape, SHAPES, "shape"),
                                     (self.position, POSITIONS, "position")):
            if value not in allowed:
                raise ArgumentError(f"{what} {value!r} is not one of {list(allowed)}")

    def words(self) -> str:
        return f"a {self.colour} {self.shape} on the {self.position}"


@dataclass
class Scene:
    """A rendered scene: ``image`` ``[H, W, 3]`` uint8, ``masks`` ``[object, H, W]`` bool (the pixels each object
    painted), the ``objects`` and their ``caption``."""

    objects: tuple[Shape, ...]
    caption: str
    image: np.ndarray
    masks: np.ndarray


def caption(objects) -> str:
    """``"a red circle on the left"`` or ``"a red circle on the left and a blue square on the right"``."""
    return " and ".join(o.words() for o in objects)


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        half = r * 0.85
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    # an upward isosceles triangle inside the same 2r × 2r box: width grows linearly from apex to base
    top, bottom = cy - r, cy + r
    inside = (y >= top) & (y <= bottom)
    return inside & (np.abs(x - cx) <= (y - top) / (bottom - top) * r)


def render(objects, size: int = 32, jitter: np.random.Generator | None = None) -> Scene:
    """Draw ``objects`` (a list of ``Shape``; two must sit on opposite sides) on a ``size`` × ``size`` grey image.

    Args:
        objects: one or two ``Shape``.
        size: image side in pixels. Default 32.
        jitter: a numpy ``Generator`` to move each centre by up to 4% of the side and scale it by ±10%; ``None``:
            the canonical layout.

    Raises:
        ArgumentError (a ValueError): no object, more than two, or two that are not on opposite sides.
    """
    objects = tuple(objects)
    if not all(isinstance(o, Shape) for o in objects):
        raise ArgumentTypeError(f"objects must be Shape(colour, shape, position) values; got {[type(o).__name__ for o in objects]}")
    if not isinstance(size, int) or size < 8:
        raise ArgumentError(f"size must be an integer ≥ 8 pixels; got {size!r}")
    if not 1 <= len(objects) <= 2:
        raise ArgumentError(f"a scene holds one or two objects; got {len(objects)}")
    if len(objects) == 2 and _OPPOSITE[objects[0].position] != objects[1].position:
        raise ArgumentError(f"two objects must sit on opposite sides; got {objects[0].position} and {objects[1].position}")
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    masks = np.zeros((len(objects), size, size), dtype=bool)
    for i, obj in enumerate(objects):
        fx, fy = _CENTRES[obj.position]
        scale = 1.0
        if jitter is not None:
            fx, fy = fx + jitter.uniform(-0.04, 0.04), fy + jitter.uniform(-0.04, 0.04)
            scale = jitter.uniform(0.9, 1.1)
        mask = _shape_mask(obj.shape, fx * size, fy * size, _RADIUS * size * scale, size)
        masks[:i, mask] = False  # a later object covers an earlier one
        masks[i] = mask
        image[mask] = COLOURS[obj.colour]
    return Scene(objects=objects, caption=caption(objects), image=image, masks=masks)


def sample_objects(rng: np.random.Generator, held_out=frozenset()) -> tuple[Shape, ...]:
    """One or two random objects (half the scenes each); ``held_out``: (colour, shape) pairs never drawn."""
    pairs = [p for p in product(COLOURS, SHAPES) if p not in held_out]
    first = POSITIONS[rng.integers(len(POSITIONS))]
    sides = [first] if rng.random() < 0.5 else [first, _OPPOSITE[first]]
    return tuple(Shape(*pairs[rng.integers(len(pairs))], side) for side in sides)


def nearest_colour(image: np.ndarray, tolerance: float = 60.0) -> np.ndarray:
    """Per pixel, the index of the nearest colour in ``COLOURS`` (−1 for background or anything farther than
    ``tolerance`` in RGB)."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    dist = np.linalg.norm(image[..., None, :].astype(np.float32) - palette, axis=-1)  # [H, W, colour]
    label = dist.argmin(-1)
    label[dist.min(-1) > tolerance] = -1
    return label


def read_scene(image: np.ndarray, min_area: float = 0.01) -> list[Shape]:
    """What a scene shows, read back programmatically: per colour region (≥ ``min_area`` of the image), its colour
    (nearest palette colour), shape (the filled share of its bounding box: closest of circle π/4, square 1,
    triangle 1/2) and position (the side its centroid is nearest to). Sorted left→right, then top→bottom.

    The checker for generated images (caption following); on rendered scenes it reads back exactly their objects.

    Raises:
        ArgumentError (a ValueError): not an ``[H, W, 3]`` (or RGBA) image.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ArgumentError(f"read_scene takes an [H, W, 3] RGB image (uint8, or floats in 0–1); got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:  # floats in 0–1, as pipelines return with output_type="np"
        image = (np.clip(image.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    size_h, size_w = image.shape[:2]
    labels = nearest_colour(image)
    found = []
    for index, colour in enumerate(COLOURS):
        ys, xs = np.nonzero(labels == index)
        if len(ys) < min_area * size_h * size_w:
            continue
        for part in _split_sides(xs, ys, size_w, size_h):
            px, py = part
            if len(px) < min_area * size_h * size_w:
                continue
            box = (px.max() - px.min() + 1) * (py.max() - py.min() + 1)
            fill = len(px) / box
            shape = min(_FILL, key=lambda s: abs(_FILL[s] - fill))
            cx, cy = (px.mean() + 0.5) / size_w, (py.mean() + 0.5) / size_h
            position = min(_CENTRES, key=lambda p: (_CENTRES[p][0] - cx) ** 2 + (_CENTRES[p][1] - cy) ** 2)
            found.append((cx, cy, Shape(colour, shape, position)))
    return [s for _, _, s in sorted(found, key=lambda t: (round(t[0], 1), t[1]))]


def _split_sides(xs, ys, width, height):
    """A colour's pixels as one object, or two when they fall on opposite halves with a gap between them (two
    objects of the same colour)."""
    for coords, side in ((xs, width), (ys, height)):
        low, high = coords < side / 2, coords >= side / 2
        if low.any() and high.any():
            gap = coords[high].min() - coords[low].max()
            if gap > 1:
                return [(xs[low], ys[low]), (xs[high], ys[high])]
    return [(xs, ys)]


def _check(heat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heat, mask = np.asarray(heat, dtype=np.float64), np.asarray(mask)
    if not np.isfinite(heat).all():
        raise ArgumentError(f"the heat map has {int((~np.isfinite(heat)).sum())} non-finite values (nan or inf)")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ArgumentError("the mask must be boolean (or 0 / 1); got other values: threshold it first")
    mask = mask.astype(bool)
    if heat.shape != mask.shape:
        raise ArgumentError(f"heat map {heat.shape} and mask {mask.shape} differ in shape: resize the map to the image")
    if not mask.any():
        raise ArgumentError("the mask is empty: no object pixels to score against")
    return heat, mask


def area_matched_iou(heat, mask) -> float:
    """IoU of the map's top pixels — as many as the object has — with the object's mask (0–1; 1: the map's top
    area is exactly the object). Ties at the cut are broken by pixel order."""
    heat, mask = _check(heat, mask)
    k = int(mask.sum())
    top = np.zeros(heat.size, dtype=bool)
    top[np.argsort(-heat.ravel(), kind="stable")[:k]] = True
    top = top.reshape(heat.shape)
    return float((top & mask).sum() / (top | mask).sum())


def threshold_iou(heat, mask, threshold: float = 0.5) -> float:
    """IoU of ``heat ≥ threshold`` (after min–max scaling to 0–1) with the mask. A constant map selects everything."""
    heat, mask = _check(heat, mask)
    span = heat.max() - heat.min()
    scaled = (heat - heat.min()) / span if span > 0 else np.ones_like(heat)
    chosen = scaled >= threshold
    return float((chosen & mask).sum() / (chosen | mask).sum())


def peak_inside(heat, mask) -> bool:
    """Whether the map's maximum lies on the object (the first maximum in pixel order)."""
    heat, mask = _check(heat, mask)
    return bool(mask.ravel()[int(np.argmax(heat))])


def mass_inside(heat, mask) -> float:
    """The share of the map's total (non-negative) mass that lies on the object (0–1; chance: the object's area share)."""
    heat, mask = _check(heat, mask)
    heat = np.clip(heat, 0, None)
    total = heat.sum()
    return float(heat[mask].sum() / total) if total > 0 else float("nan")
