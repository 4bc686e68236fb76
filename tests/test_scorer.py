"""The presence scorer (attnprobe.study.scorer) on a tiny random-weight CLIP: shapes, ranges, the two measures against
their definitions recomputed from the model's own towers, input types, and loading errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from attnprobe import ModelLoadError
from attnprobe.study.scorer import CLIPSCORE_W, CLIPScorer, PresenceScorer, load_scorer
from attnprobe.testing import tiny_clip


@pytest.fixture(scope="module")
def scorer():
    return load_scorer("tiny")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 64, 64, generator=g)  # [image, channel, H, W] in [0, 1]


def test_shapes_and_ranges(scorer, images):
    assert isinstance(scorer, PresenceScorer) and scorer.random_weights
    sim = scorer.similarity(images, ["a picture of dog", "a picture", "a cat"])
    assert sim.shape == (4, 3) and sim.dtype == torch.float32
    assert (sim.abs() <= 1 + 1e-6).all()
    score, acc = scorer.score(images, "dog"), scorer.accuracy(images, "dog")
    assert score.shape == acc.shape == (4,)
    assert ((score >= 0) & (score <= CLIPSCORE_W)).all()
    assert set(acc.tolist()) <= {0.0, 1.0}


@torch.no_grad()
def test_measures_match_their_definitions(scorer, images):
    model, processor = scorer.model, scorer.processor
    pixels = processor(images=[Image.fromarray((i.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                               for i in images], return_tensors="pt").pixel_values
    texts = processor.tokenizer(["a picture of dog", "a picture"], padding=True, return_tensors="pt")
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double()
    text = model.text_projection(model.text_model(**texts).pooler_output).double()
    cos = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T  # [image, text]
    assert torch.allclose(scorer.score(images, "dog").double(), 2.5 * cos[:, 0].clamp(min=0), atol=1e-5)
    assert torch.equal(scorer.accuracy(images, "dog"), (cos[:, 0] > cos[:, 1]).float())


def test_pil_tensor_and_array_inputs_agree(scorer, images):
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # [image, H, W, 3]
    pil = [Image.fromarray(a) for a in arrays]
    by_tensor = scorer.score(images, "dog")
    assert torch.allclose(scorer.score(pil, "dog"), by_tensor, atol=1e-6)
    assert torch.allclose(scorer.score(arrays, "dog"), by_tensor, atol=1e-6)
    assert scorer.score(pil[0], "dog").shape == (1,)
    with pytest.raises(TypeError, match="images must be"):
        scorer.score("a picture", "dog")
    with pytest.raises(ValueError, match=r"\[image, 3, H, W\]"):
        scorer.score(torch.rand(2, 5, 8, 8), "dog")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]; got values from [0-9.e-]+ to 2[0-9.]+ \(pass uint8"):
        scorer.score(images * 255, "dog")  # 0–255 floats would have read as a white image


def test_loading(tmp_path):
    a, b = load_scorer("tiny"), load_scorer("tiny")
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(a.score(images, "dog"), b.score(images, "dog"))  # seeded: the same model each time
    assert load_scorer("none") is None and load_scorer(None) is None
    with pytest.raises(ModelLoadError, match="could not load scorer .*no such folder"):
        load_scorer(str(tmp_path / "no-such-clip"))
    with pytest.raises(ValueError, match="no {c}"):
        CLIPScorer(*tiny_clip(), target="a picture")


def test_a_saved_clip_loads_from_its_folder(tmp_path):
    model, processor = tiny_clip()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_scorer(str(tmp_path))
    assert loaded.name == str(tmp_path) and not loaded.random_weights
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.score(images, "dog"), CLIPScorer(model, processor).score(images, "dog"), atol=1e-6)
