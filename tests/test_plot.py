"""Figures: shapes and labels, not pixels."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from attnprobe.analysis.figures import plot_delta_auc, plot_heatmaps, plot_presence, plot_site_call_grid, plot_text_similarity, plot_trajectories  # noqa: E402
from attnprobe.testing import synthetic_store  # noqa: E402


def test_trajectories_one_panel_per_concept_with_bands():
    fig = plot_trajectories({"dog": {"baseline": np.ones((3, 5)), "instruction": np.zeros((3, 5))},
                             "cat": {"baseline": np.ones((1, 5))}})
    axes = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["dog", "cat"]
    assert len(axes[0].lines) == 2 and len(axes[0].collections) == 2  # a band per variant with several seeds
    assert len(axes[1].collections) == 0  # one seed: no band


def test_delta_auc_two_panels():
    rows = [dict(concept="dog", variant="instruction", delta_auc=0.1, ci_low=0.0, ci_high=0.2, delta_auc_last=-0.1,
                 ci_low_last=float("nan"), ci_high_last=float("nan"))]
    fig = plot_delta_auc(rows)
    assert len(fig.axes) == 2 and "requested" in fig.axes[0].get_title() and "every mention" in fig.axes[1].get_title()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["dog"]


def test_heatmaps_grid_and_colour_bar():
    maps = {"dog": {"baseline": np.random.rand(8, 8), "instruction": np.random.rand(8, 8)}}
    fig = plot_heatmaps({"dog": {"baseline": np.zeros((8, 8, 3))}}, maps)
    assert len(fig.axes) == 3  # two panels and the colour bar
    assert fig.axes[0].get_title() == "baseline" and fig.axes[0].get_ylabel() == "dog"


def test_site_call_grid():
    store = synthetic_store(calls=4, sites=3, grid=(2, 3), mass={"dog": [0.4, 0.3, 0.2, 0.1]})
    fig = plot_site_call_grid(store, "dog", max_calls=2)
    assert len(fig.axes) == 3 * 2 + 1
    assert fig.axes[0].get_title().startswith("call 0") and fig.axes[1].get_title().startswith("call 3")
    assert fig.axes[0].images[0].get_array().shape == (2, 3)
    fig = plot_site_call_grid(store, "dog")  # fewer calls (4) than max_calls (6): every call, the last included
    assert len(fig.axes) == 3 * 4 + 1 and fig.axes[3].get_title().startswith("call 3")


def test_text_similarity_rows_per_encoder():
    rows = [dict(concept="dog", variant=v, encoder=e, layer=l, concept_cos_last=1.0)
            for v in ("baseline", "instruction") for e in ("text_encoder", "text_encoder_2", "conditioning")
            for l in range(3)]
    fig = plot_text_similarity(rows)
    visible = [a for a in fig.axes if a.get_visible()]
    assert len(visible) == 2 and "text_encoder_2" in visible[1].get_title()
    many = [dict(r, concept=f"c{k}") for k in range(7) for r in rows]
    fig = plot_text_similarity(many, cols=5)
    assert len([a for a in fig.axes if a.get_visible()]) == 14 and len(fig.axes) == 2 * 2 * 5


def test_custom_variants_keep_distinct_colours_in_every_figure():
    rows = [dict(concept="dog", variant=v, encoder="text_encoder", layer=l, concept_cos_last=1.0)
            for v in ("baseline", "mine", "yours") for l in range(2)]
    fig = plot_text_similarity(rows)
    colours = [line.get_color() for line in fig.axes[0].lines if line.get_label() in ("mine", "yours")]
    assert len(set(colours)) == 2


def test_presence_labels_of_near_points_do_not_overlap():
    # three concepts of one variant a hair apart on the same Δ presence: their labels ran into one another
    rows = [dict(concept=c, variant="instruction", delta_auc_last=x, ci_low_last=x - 0.001, ci_high_last=x + 0.001,
                 delta_presence=0.0, ci_low_presence=-0.1, ci_high_presence=0.1)
            for c, x in (("green square", -0.0330), ("red circle", -0.0325), ("blue triangle", -0.0320))]
    fig = plot_presence(rows, scorer="shapes")
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert [t.get_text() for t in fig.axes[0].texts] == ["green square", "red circle", "blue triangle"]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
