"""The study on video denoisers (``attnprobe.study.video``): a tiny Wan and CogVideoX study end to end (tables, frame
figures, report.html, resume), the same noise for every video of a cell, the frame count's refusals, and the frame
helpers on synthetic stores with known answers."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import attnprobe
from attnprobe.analysis.figures import plot_frames
from attnprobe.errors import ConfigError
from attnprobe.study import video
from attnprobe.study.cells import Cell, read_cell, shard_path
from attnprobe.study.cli import main
from attnprobe.testing import synthetic_video_store, tiny_pipeline

TINY = dict(concepts=["dog"], seeds=[0], steps=2, progress=False, echo=False)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _page_data(folder):
    return json.loads(re.search(r"const DATA = (.*?);\n", (folder / "report.html").read_text()).group(1))["cells"]


@pytest.fixture(scope="module")
def wan_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("wan") / "study"
    return attnprobe.study(model="tiny-wan", out=out, **TINY)


def test_a_wan_study_writes_its_tables_frame_figures_and_page(wan_study):
    out = wan_study.out
    names = {p.name for p in wan_study.files}
    assert {"auc.csv", "summary.csv", "trajectories.csv", "contrasts.csv", "heatmaps.png", "frames.png",
            "trajectories.png", "report.html"} <= names
    assert _rows(out / "failures.csv") == []
    aucs = _rows(out / "auc.csv")
    assert [r["variant"] for r in aucs] == ["baseline", "instruction", "implicit", "repetition"]
    assert all(0 < float(r["auc_last"]) < 1 for r in aucs)
    assert {r["call"] for r in _rows(out / "trajectories.csv")} == {"0", "1"}  # the prompt's pass of 2 steps
    assert wan_study.videos == {"tiny-wan": {"frames": 9, "latent_frames": 3, "qt": 3, "shown": 4,
                                             "spans": [[0, 0], [1, 4], [5, 8]]}}
    _, tensors = read_cell(out, {"file": str(shard_path(out, Cell("tiny-wan", "dog", 0)).relative_to(out))})
    assert tensors["framemaps.0"].shape == (3, 4, 4)  # [qt, h, w]: 64 px → 8 × 8 latents → 4 × 4 patches
    assert tensors["frameimages.0"].shape == (3, 64, 64, 3) and tensors["image.0"].shape == (64, 64, 3)
    assert tensors["sitemaps.0"].shape[-2:] == (4, 4)  # the browser's maps: the latent frames averaged
    frames = Image.open(out / "frames.png")
    assert frames.size[1] > frames.size[0] / 4  # a strip per row of the question: baseline and instruction
    cell = _page_data(out)[0]
    assert cell["video"]["spans"] == [[0, 0], [1, 4], [5, 8]]
    assert all(r["frames"]["shape"] == [3, 4, 4] and len(r["frame_images"]) == 3 for r in cell["rows"])
    page = (out / "report.html").read_text()
    assert "frames.png" in page and "id=frame" in page and "Video (tiny-wan): 9 frames per video" in page


def test_a_video_study_resumes_and_redraws_its_page(wan_study, tmp_path):
    again = attnprobe.study(model="tiny-wan", out=wan_study.out, **TINY)
    assert again.skipped == 1 and again.done == 1 and again.videos["tiny-wan"]["frames"] == 9
    assert main(["report", str(wan_study.out)]) == 0
    assert _page_data(wan_study.out)[0]["video"]["frames"] == 9


def test_every_video_of_a_cell_starts_from_the_seed_s_noise(tmp_path):
    """Two rows with the same prompt in one pipeline call give the same video and the same attention: the pipeline
    drew every video's noise from a generator seeded alike (CogVideoX: latents ``[B, F, C, h, w]``)."""
    result = attnprobe.study(model="tiny-cogvideox", out=tmp_path / "s", variants=["baseline", "again=a picture of {c}"],
                             scorer="none", **TINY)
    aucs = {r["variant"]: r for r in result.aucs}
    assert aucs["again"]["auc_last"] == pytest.approx(aucs["baseline"]["auc_last"], rel=1e-6)
    _, tensors = read_cell(result.out, {"file": str(shard_path(result.out, Cell("tiny-cogvideox", "dog", 0))
                                                    .relative_to(result.out))})
    assert torch.equal(tensors["image.0"], tensors["image.1"])
    assert torch.equal(tensors["frameimages.0"], tensors["frameimages.1"])


def test_the_command_line_takes_frames(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["study", "--model", "tiny-wan", "--out", str(out), "--concepts", "dog", "--seeds", "0", "--steps",
                 "1", "--variants", "baseline,instruction", "--frames", "5", "--scorer", "none", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "frames=5" in printed and "Video (tiny-wan): 5 frames per video (2 latent frames)" in printed
    assert json.loads((out / "study.json").read_text())["frames"] == 5
    assert _page_data(out)[0]["video"]["spans"] == [[0, 0], [1, 4]]


def test_a_frame_count_the_model_cannot_make_is_refused_before_generating(tmp_path):
    with pytest.raises(ConfigError, match=r"frames 8: model 'tiny-wan' compresses time by 4.*use 5 or 9"):
        attnprobe.study(model="tiny-wan", out=tmp_path / "a", frames=8, **TINY)
    with pytest.raises(ConfigError, match="frames=9: model 'tiny'.*makes images"):
        attnprobe.study(model="tiny", out=tmp_path / "b", frames=9, **TINY)
    with pytest.raises(ConfigError, match="frames must be a whole number"):
        attnprobe.study(model="tiny-wan", out=tmp_path / "c", frames=0, **TINY)
    assert not any((tmp_path / n).exists() for n in "abc")


# --- the frame helpers ------------------------------------------------------------------------------------------------

def _pipe(**attrs):
    """A stand-in pipeline: a ``__call__`` that takes ``num_frames`` and the given attributes."""
    cls = type("FakeVideoPipeline", (), {"__call__": lambda self, prompt=None, num_frames=9, output_type="np": None})
    pipe = cls()
    for k, v in attrs.items():
        setattr(pipe, k, v)
    return pipe


def test_frames_follow_the_temporal_compression_the_pipeline_declares():
    assert video.check_frames(tiny_pipeline("wan"), None, "wan") == 9
    assert video.temporal_compression(_pipe(vae_temporal_compression_ratio=8)) == 8  # LTX's name
    assert video.check_frames(_pipe(vae_temporal_compression_ratio=8), None, "ltx") == 17
    assert video.check_frames(_pipe(vae_scale_factor_temporal=8), 25, "x") == 25
    with pytest.raises(ConfigError, match="use 17 or 25"):
        video.check_frames(_pipe(vae_scale_factor_temporal=8), 20, "x")
    assert video.check_frames(_pipe(), 6, "no compression") == 6  # no temporal compression: any count
    no_frames = type("P", (), {"__call__": lambda self, prompt=None: None})()
    with pytest.raises(ConfigError, match="takes no num_frames"):
        video.check_frames(no_frames, None, "x")
    assert video.video_options(_pipe(), 9) == {"num_frames": 9, "output_type": "pil"}


def test_the_still_of_a_video_is_its_middle_decoded_frame():
    pil = [Image.new("RGB", (4, 4), (10 * i, 0, 0)) for i in range(9)]
    assert video.middle_frame(pil).getpixel((0, 0)) == (40, 0, 0)
    arr = np.stack([np.full((4, 4, 3), i / 10, dtype=np.float32) for i in range(5)])  # [frame, H, W, C] in [0, 1]
    assert video.middle_frame(arr).getpixel((0, 0)) == (51, 51, 51)
    tensor = torch.stack([torch.full((3, 4, 4), i / 10) for i in range(4)])  # [frame, C, H, W]: frame 2 of 4
    assert video.middle_frame(tensor).getpixel((0, 0)) == (51, 51, 51)


def test_each_latent_frame_is_shown_over_the_middle_of_the_frames_it_decodes_to():
    store = synthetic_video_store(frames=3, prompt="a dog", frame_mass={"dog": [0.1, 0.2, 0.6]})  # 9 decoded frames
    record = video.frame_record(store, 9)
    assert record == {"frames": 9, "latent_frames": 3, "qt": 3, "shown": 4, "spans": [[0, 0], [1, 4], [5, 8]]}
    pil = [Image.new("RGB", (200, 100), (i, 0, 0)) for i in range(9)]
    stills = video.frame_stills(pil, record["spans"])
    assert stills.shape == (3, 32, 64, 3) and stills[:, 0, 0, 0].tolist() == [0, 2, 6]  # frames 0, (1+4)//2, (5+8)//2
    assert video.frame_stills(pil, None) is None
    assert video.frame_spans(store, 8) is None  # a count the store cannot map: no spans, no frame images
    maps = video.frame_maps(store, "dog", 0, (2, 2))
    assert maps.shape == (3, 2, 2) and maps.float()[:, 0, 0].tolist() == pytest.approx([0.1, 0.2, 0.6], abs=1e-3)


def test_a_long_video_s_strip_shows_twelve_latent_frames_first_and_last_kept():
    maps = np.random.default_rng(0).random((21, 4, 4))
    spans = [[0, 0]] + [[4 * t - 3, 4 * t] for t in range(1, 21)]
    fig = plot_frames({"dog": {"baseline": (maps, None, {"spans": spans})}})
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 12 and titles[0] == "latent 0\nframe 0" and titles[-1] == "latent 20\nframes 77–80"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_a_video_is_told_by_its_family_and_gets_a_generator_per_video():
    assert not video.is_video(tiny_pipeline("sd")) and video.is_video(tiny_pipeline("cogvideox"))
    assert [g.initial_seed() for g in video.noise(7, 2)["generator"]] == [7, 7]


def test_frame_counts_follow_the_vae_and_the_pipelines_argument():
    """Allegro's VAE decodes every latent frame to 4 frames (k·4, not k·4 + 1); Sana-Video's pipeline takes
    ``frames``, not ``num_frames``."""
    from attnprobe.study import video as vid
    from attnprobe.testing import tiny_pipeline

    allegro = tiny_pipeline("allegro")
    assert vid.check_frames(allegro, None, "tiny-allegro") == 12 and vid.check_frames(allegro, 8, "tiny-allegro") == 8
    with pytest.raises(attnprobe.ConfigError, match="decodes every latent frame to 4 frames.*use 8 or 12"):
        vid.check_frames(allegro, 9, "tiny-allegro")
    sana = tiny_pipeline("sana-video")
    assert vid.frame_argument(sana) == "frames" and vid.video_options(sana, 9)["frames"] == 9
    assert vid.check_frames(sana, None, "tiny-sana-video") == 9


def test_cogvideox_frame_counts_give_an_odd_number_of_latent_frames():
    """CogVideoX's VAE decodes an even number of latent frames in pairs (13 frames → 4 latent frames → 16 frames): the
    study refuses those counts instead of recording a frame count the videos do not have."""
    from attnprobe.study import video as vid
    from attnprobe.testing import tiny_pipeline

    pipe = tiny_pipeline("cogvideox")
    assert vid.check_frames(pipe, 9, "tiny-cogvideox") == 9 and vid.check_frames(pipe, 17, "tiny-cogvideox") == 17
    for frames in (5, 13):
        with pytest.raises(attnprobe.ConfigError, match=f"decodes latent frames in pairs.*not {frames}: use"):
            vid.check_frames(pipe, frames, "tiny-cogvideox")
