"""The shapes data: masks match images, the checker reads scenes back, heat-map scores on known overlaps."""

import numpy as np
import pytest

from attnprobe.models.shapes.scenes import (
    BACKGROUND, COLOURS, Shape, area_matched_iou, mass_inside, peak_inside, read_scene, render, sample_objects,
    threshold_iou,
)


def test_masks_are_exactly_the_pixels_each_object_painted():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = render(sample_objects(rng), size=32, jitter=rng)
        covered = np.zeros((32, 32), dtype=bool)
        for obj, mask in zip(scene.objects, scene.masks):
            assert mask.sum() > 20
            assert (scene.image[mask] == COLOURS[obj.colour]).all()
            assert not (covered & mask).any()  # masks never overlap
            covered |= mask
        assert (scene.image[~covered] == BACKGROUND).all()


@pytest.mark.parametrize("size", [32, 64])
def test_the_checker_reads_every_rendered_scene_back(size):
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = render(sample_objects(rng), size=size, jitter=rng)
        key = lambda s: (s.colour, s.shape, s.position)  # noqa: E731
        assert sorted(map(key, read_scene(scene.image))) == sorted(map(key, scene.objects)), scene.caption


def test_bad_scenes_are_refused():
    with pytest.raises(ValueError, match="colour 'purple' is not one of"):
        Shape("purple", "circle", "left")
    with pytest.raises(ValueError, match="opposite sides"):
        render([Shape("red", "circle", "left"), Shape("blue", "square", "top")])
    with pytest.raises(ValueError, match="one or two objects"):
        render([])


def test_held_out_pairs_are_never_drawn():
    rng = np.random.default_rng(2)
    held = {("red", "triangle"), ("blue", "circle")}
    drawn = {(o.colour, o.shape) for _ in range(500) for o in sample_objects(rng, held_out=held)}
    assert not drawn & held and len(drawn) == 7


def test_heat_map_scores_on_known_overlaps():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :5] = True  # the left half: 50 pixels
    exact = mask.astype(float)
    assert area_matched_iou(exact, mask) == 1.0 and threshold_iou(exact, mask) == 1.0
    assert peak_inside(exact, mask) and mass_inside(exact, mask) == 1.0
    shifted = np.zeros((10, 10))
    shifted[:, 3:8] = 1.0  # 20 of its 50 pixels on the object: IoU 20 / 80
    assert area_matched_iou(shifted, mask) == pytest.approx(0.25)
    assert threshold_iou(shifted, mask) == pytest.approx(0.25)
    assert mass_inside(shifted, mask) == pytest.approx(0.4)
    opposite = 1.0 - exact
    assert area_matched_iou(opposite, mask) == 0.0 and not peak_inside(opposite, mask)
    uniform = np.ones((10, 10))
    assert mass_inside(uniform, mask) == pytest.approx(0.5)  # chance: the object's area share
    assert threshold_iou(uniform, mask) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        area_matched_iou(np.ones((8, 8)), mask)
    with pytest.raises(ValueError, match="mask is empty"):
        mass_inside(uniform, np.zeros((10, 10), dtype=bool))


def test_bad_maps_images_and_objects_get_clear_errors():
    from attnprobe.models.shapes.scenes import Shape, area_matched_iou, read_scene, render

    mask = np.zeros((4, 4), bool)
    mask[0] = True
    with pytest.raises(ValueError, match="non-finite"):
        area_matched_iou(np.full((4, 4), np.nan), mask)
    with pytest.raises(ValueError, match="boolean"):
        area_matched_iou(np.ones((4, 4)), np.full((4, 4), 0.1))
    with pytest.raises(TypeError, match="Shape"):
        render(["red circle"])
    with pytest.raises(ValueError, match="size"):
        render([Shape("red", "circle", "left")], size=0)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        read_scene(np.zeros((8, 8)))
    image = render([Shape("red", "circle", "left")]).image
    assert read_scene(image / 255.0) == read_scene(image) == [Shape("red", "circle", "left")]
