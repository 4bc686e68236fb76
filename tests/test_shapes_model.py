"""The shipped shapes model (attnprobe.models.shapes.model): loads as a normal pipeline, generates what it generated
when its figures were measured, runs through the study; its training script and evaluation helpers."""

import numpy as np
import pytest
import torch

import attnprobe
from attnprobe.models.loader import load_pipeline
from attnprobe.study.scorer import ShapesScorer, load_scorer
from attnprobe.models.shapes import scenes as shapes
from attnprobe.models.shapes.scenes import Shape, render
from attnprobe.models.shapes.evaluate import _occurrence, colour_masks, match_objects
from attnprobe.models.shapes.model import MAX_TOKENS, weights_folder

# image statistics of the 4-step generation below, when the shipped weights were measured (docs/shapes-model.md)
CAPTION = "a red circle on the left and a blue square on the right"
STORED_MEAN = [0.5653, 0.4434, 0.4447]  # per RGB channel, 0–1
STORED_STD = [0.1306, 0.1314, 0.1377]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("shapes")


def test_shipped_weights_load_as_a_stable_diffusion_pipeline(pipe):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    assert type(pipe) is StableDiffusionPipeline
    assert isinstance(pipe.text_encoder, CLIPTextModel) and pipe.text_encoder.config.num_hidden_layers == 0
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and pipe.tokenizer.model_max_length == MAX_TOKENS
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # the real CLIP BPE
    plain = DiffusionPipeline.from_pretrained(str(weights_folder()))  # a normal diffusers folder
    assert type(plain) is StableDiffusionPipeline
    size = sum(f.stat().st_size for f in weights_folder().rglob("*") if f.is_file())
    assert size < 16e6, size


def test_a_fixed_generation_matches_the_stored_statistics(pipe):
    image = pipe(CAPTION, num_inference_steps=4, generator=torch.Generator().manual_seed(0), height=32, width=32,
                 output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    mean, std = image.reshape(-1, 3).mean(0), image.reshape(-1, 3).std(0)
    np.testing.assert_allclose(mean, STORED_MEAN, atol=0.02)
    np.testing.assert_allclose(std, STORED_STD, atol=0.02)


def test_the_study_runs_on_the_shapes_model_with_its_own_defaults(tmp_path):
    result = attnprobe.study("shapes", out=tmp_path / "s", concepts=["red circle"], seeds=[0], steps=3,
                             progress=False, echo=False)
    assert not result.failures
    assert {r["variant"] for r in result.summary} == {"baseline", "instruction", "implicit", "repetition"}
    assert {r["prompt"] for r in result.aucs} >= {"a red circle on the left",
                                                  "please forget red circle . please draw a red circle on the left"}
    assert result.text and all(np.isfinite(r["concept_cos"]) for r in result.text)  # a 0-layer text encoder
    presence = [r["presence"] for r in result.aucs]
    assert set(presence) <= {0.0, 1.0}
    scorer = ShapesScorer()  # the count is the checker's, and presence is a count > 0
    for r in result.aucs:
        assert r["presence"] == float(r["count"] > 0) and r["count"] == int(r["count"])
    assert {"delta_count", "count"} <= set(result.summary[0])
    assert {r["measure"] for r in result.contrasts} == {"delta_auc_last", "delta_presence", "delta_count"}
    two = render([Shape("red", "circle", "left"), Shape("red", "square", "right")]).image
    assert scorer.count(two, "red circle").tolist() == [1.0] and scorer.count(two, "red").tolist() == [2.0]


def test_the_shapes_scorer_reads_rendered_scenes():
    scorer = load_scorer("shapes")
    assert isinstance(scorer, ShapesScorer)
    images = np.stack([render([Shape("red", "circle", "left"), Shape("blue", "square", "right")]).image,
                       render([Shape("green", "triangle", "top")]).image])
    assert scorer.score(images, "red circle").tolist() == [1.0, 0.0]
    assert scorer.score(images, "triangle").tolist() == [0.0, 1.0]
    assert scorer.score(images, "blue square on the right").tolist() == [1.0, 0.0]
    assert scorer.score(images, "blue square on the left").tolist() == [0.0, 0.0]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 tensors are read as 0–255 pixels
    assert scorer.score(pixels, "red circle").tolist() == scorer.score(pixels / 255, "red circle").tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="does not know"):
        scorer.score(images, "dog")
    with pytest.raises(ValueError, match="names no colour"):
        scorer.score(images, "the")


def test_objects_are_matched_by_colour_then_position():
    wanted = [Shape("red", "circle", "left"), Shape("red", "square", "right")]
    found = [Shape("red", "square", "right"), Shape("red", "triangle", "left")]
    assert match_objects(wanted, found) == [{"colour": True, "shape": False, "position": True},
                                            {"colour": True, "shape": True, "position": True}]
    assert match_objects(wanted[:1], []) == [{"colour": False, "shape": False, "position": False}]
    objects = (Shape("red", "circle", "left"), Shape("blue", "circle", "right"))
    assert [_occurrence(objects, k, "circle") for k in (0, 1)] == [0, 1]


def test_colour_segmentation_masks_of_a_rendered_scene_are_its_masks():
    scene = render([Shape("green", "circle", "top"), Shape("green", "square", "bottom")], size=32)
    masks = colour_masks(scene.image, scene.objects)
    np.testing.assert_array_equal(np.stack(masks), scene.masks)


def test_training_is_seeded_and_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from attnprobe.models.shapes.model import train

    folders = [train(tmp_path / name, seed=0, scenes=64, vae_steps=2, unet_steps=2, batch=4, save_every=2, threads=1,
                     quiet=True) for name in ("a", "b")]
    loaded = [StableDiffusionPipeline.from_pretrained(str(f)) for f in folders]
    for p, q in zip(loaded[0].unet.parameters(), loaded[1].unet.parameters()):
        assert torch.equal(p, q)
    assert shapes.caption([Shape("red", "circle", "left")]) == "a red circle on the left"


def test_bad_shapes_studies_stop_before_generating(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"does not know \['dog'\]"):
        attnprobe.study("shapes", out=tmp_path / "a", concepts=["dog"], seeds=[0], steps=2, progress=False)
    with pytest.raises(ValueError, match=r"does not know \['purple'\]"):
        attnprobe.study("shapes", out=tmp_path / "b", concepts=["purple circle"], seeds=[0], steps=2, progress=False)
    with pytest.raises(ValueError, match="model 'shapes' \\(16 tokens\\).*put 'shapes' first"):
        attnprobe.study(["tiny", "shapes"], out=tmp_path / "c", concepts=["red circle"], seeds=[0], steps=2,
                        progress=False)
    assert not any(tmp_path.iterdir())  # nothing was made


def test_a_template_cut_by_the_16_tokens_is_warned_about(tmp_path, capsys):
    long = "long=a {c} on the left and a green square on the right and more words"
    attnprobe.study("shapes", out=tmp_path / "s", concepts=["red circle"], variants=[long], seeds=[0], steps=2,
                    progress=False, echo=False)
    assert "variant 'long' is 18 tokens" in capsys.readouterr().err


def test_concepts_the_shapes_model_cannot_draw_are_warned_about():
    from attnprobe.study.variants import shapes_concept_warnings

    err = "\n".join(shapes_concept_warnings(["dog", "red circle", "blue circle"]))  # what --scorer none lets through
    assert "'dog': the shapes model knows only the colours red, green, blue" in err
    assert "'blue circle': the shapes model never saw a blue circle" in err and "'red circle'" not in err


def test_the_shapes_command_line_refuses_bad_input(tmp_path, capsys):
    from attnprobe.models.shapes.__main__ import main
    from attnprobe.models.shapes.model import train

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.jsonl").write_text("{}\n")
    for argv, message in ((["train", "--out", str(tmp_path / "run")], "already holds a run"),
                          (["train", "--unet-steps", "0"], "must be ≥ 1"),
                          (["evaluate", "--out", str(tmp_path / "no" / "e.json")], "existing folder"),
                          (["evaluate", "--captions", "-5"], "must be ≥ 1"),
                          (["evaluate", "--guidance", "nan"], "finite number ≥ 0; got nan"),
                          (["evaluate", "--guidance", "inf"], "finite number ≥ 0; got inf"),
                          (["evaluate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "e.json")],
                           "no such folder")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
    assert (tmp_path / "run" / "train.jsonl").read_text() == "{}\n"  # the earlier run is kept
    with pytest.raises(ValueError, match="batch must be"):
        train(tmp_path / "x", batch=0)
