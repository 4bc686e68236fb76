"""trajectory / auc / compare / heatmap on synthetic stores with known answers, and one real capture."""

from __future__ import annotations

import pytest
import torch

from attnprobe import ConceptError, SelectionError, StoreError, auc, compare, heatmap, probe, trajectory
from attnprobe.analysis import concept_positions
from attnprobe.testing import synthetic_store

BASE = "a picture of dog"
OTHER = "Please forget anything about dog. Please help me generate a picture of dog."


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


# ------------------------------------------------------------------ trajectory
def test_trajectory_equals_the_given_mass():
    store = synthetic_store(calls=4, prompt="a van gogh painting of a dog", sites=3,
                            mass={"dog": [0.5, 0.4, 0.1, 0.0], "van gogh": [0.1, 0.2, 0.3, 0.4]})
    dog = trajectory(store, "dog")
    assert dog.dtype == torch.float32 and dog.shape == (4,)
    assert close(dog, [0.5, 0.4, 0.1, 0.0])
    assert close(trajectory(store, "van gogh"), [0.1, 0.2, 0.3, 0.4])
    per_site = trajectory(store, "dog", by_site=True)
    assert per_site.shape == (4, 3) and close(per_site, dog[:, None].expand(4, 3))
    one = trajectory(store, "dog", sites=store.site_names[1])
    assert close(one, dog)


def test_uniform_maps_give_one_share_per_position():
    store = synthetic_store(calls=2, prompt="a van gogh painting")
    assert close(trajectory(store, "van gogh"), [2 / 77, 2 / 77])


def test_occurrences():
    store = synthetic_store(calls=2, prompt=OTHER, mass={"dog": [0.6, 0.2]})
    assert concept_positions(store, "dog") == [5, 14]
    assert concept_positions(store, "dog", occurrence=-1) == [14]
    assert close(trajectory(store, "dog", occurrence=0), [0.3, 0.1])
    assert close(trajectory(store, "dog", occurrence=-1), [0.3, 0.1])
    with pytest.raises(SelectionError, match=r"2 times \(occurrences 0..1"):
        trajectory(store, "dog", occurrence=2)
    with pytest.raises(IndexError, match="mentions it once"):  # a SelectionError is an IndexError too
        trajectory(synthetic_store(calls=2, mass={"dog": [0.6, 0.2]}), "dog", occurrence=1)
    with pytest.raises(ConceptError, match="cat"):
        trajectory(store, "cat")


# ------------------------------------------------------------------ auc
def test_auc_known_answers():
    assert auc(torch.full((5,), 0.3)) == pytest.approx(0.3)
    assert auc(torch.linspace(0, 1, 7)) == pytest.approx(0.5)
    assert auc(torch.tensor([0.25])) == pytest.approx(0.25)
    assert auc(torch.tensor([0.0, 1.0, 0.0])) == pytest.approx(0.5)
    assert auc([0.0, 1.0], x=[0, 4]) == pytest.approx(2.0)
    by_site = auc(torch.stack([torch.full((3,), 0.2), torch.linspace(0, 1, 3)], dim=1))
    assert close(by_site, [0.2, 0.5])
    with pytest.raises(ValueError):
        auc(torch.tensor([]))
    with pytest.raises(ValueError, match="x has"):
        auc(torch.ones(3), x=[0, 1])


def test_auc_of_a_synthetic_trajectory():
    linear = synthetic_store(calls=5, mass={"dog": torch.linspace(0, 1, 5).tolist()})
    assert auc(trajectory(linear, "dog")) == pytest.approx(0.5, abs=1e-6)
    flat = synthetic_store(calls=5, mass={"dog": [0.35] * 5})
    assert auc(trajectory(flat, "dog")) == pytest.approx(0.35, abs=1e-6)


# ------------------------------------------------------------------ compare
def test_compare_aligns_the_last_mention():
    base = synthetic_store(calls=2, prompt=BASE, mass={"dog": [0.2, 0.1]})
    other = synthetic_store(calls=2, prompt=OTHER, mass={"dog": [0.6, 0.4]})
    result = compare(base, other, "dog")
    assert result.pairs == [(0, 1)]
    assert close(result.base, [0.2, 0.1]) and close(result.other, [0.6, 0.4])
    assert close(result.delta, result.other - result.base) and close(result.delta, [0.4, 0.3])
    assert result.delta_auc == pytest.approx(auc(result.other) - auc(result.base))
    assert result.delta_auc == pytest.approx(0.35)
    assert close(result.base_aligned, [0.2, 0.1]) and close(result.other_aligned, [0.3, 0.2])
    assert close(result.delta_aligned, [0.1, 0.1]) and result.delta_auc_aligned == pytest.approx(0.1)
    assert compare(base, other, "dog", align="first").pairs == [(0, 0)]
    assert compare(other, base, "dog").pairs == [(1, 0)]
    with pytest.raises(ValueError, match="align"):
        compare(base, other, "dog", align="middle")


def test_compare_refuses_incomparable_stores():
    base = synthetic_store(calls=2, prompt=BASE)
    other = synthetic_store(calls=2, prompt=OTHER)
    other.meta["denoiser"] = "SD3Transformer2DModel"
    with pytest.raises(StoreError, match="denoiser"):
        compare(base, other, "dog")
    with pytest.raises(StoreError, match="calls: 2 vs 3"):
        compare(base, synthetic_store(calls=3, prompt=OTHER), "dog")
    with pytest.raises(StoreError, match="sites"):
        compare(base, synthetic_store(calls=2, prompt=OTHER, sites=2), "dog")
    with pytest.raises(ConceptError):
        compare(base, synthetic_store(calls=2, prompt="a cat"), "dog")


# ------------------------------------------------------------------ heatmap
def test_heatmap_puts_the_spot_at_its_place():
    store = synthetic_store(calls=2, grid=(4, 5), mass={"dog": [0.04, 0.0]}, spot={"dog": (1, 3)})
    assert close(trajectory(store, "dog"), [0.04, 0.0])
    hm = heatmap(store, "dog")
    assert hm.shape == (4, 5)  # image_size recorded in meta
    assert divmod(int(hm.argmax()), 5) == (1, 3)
    assert hm[1, 3] == pytest.approx(0.04 * 20 / 2)  # mass of the spot, averaged over two calls
    assert close(hm.sum(), 0.04 * 20 / 2)
    assert heatmap(store, "dog", normalize=True).max() == pytest.approx(1.0)
    assert heatmap(store, "dog", calls=1).abs().max() == 0
    assert divmod(int(heatmap(store, "dog", calls=[0]).argmax()), 5) == (1, 3)
    assert close(heatmap(store, "dog", calls=slice(0, 1)), heatmap(store, "dog", calls=0))


def test_heatmap_resizes():
    store = synthetic_store(calls=1, grid=(4, 4), mass={"dog": [0.05]}, spot={"dog": (3, 0)})
    hm = heatmap(store, "dog", size=(16, 16))
    assert hm.shape == (16, 16)
    y, x = divmod(int(hm.argmax()), 16)
    assert 12 <= y < 16 and 0 <= x < 4


def test_heatmap_needs_a_grid_site():
    store = synthetic_store(calls=1)
    store.flat_sites.update(store.site_names)
    with pytest.raises(StoreError, match="flat"):
        heatmap(store, "dog")


# ------------------------------------------------------------------ on a real capture
def test_trajectory_of_a_capture_matches_its_maps(sd_pipe, run):
    with probe(sd_pipe, heads="keep", dtype=torch.float32) as store:
        run(sd_pipe, "a picture of dog", num_inference_steps=3)
    want = torch.stack([store[n][:, 0, ..., 4].mean(dim=(1, 2, 3)) for n in store]).mean(0)
    got = trajectory(store, "dog")
    assert got.shape == (3,) and close(got, want)
    assert ((got > 0) & (got < 1)).all()
    assert heatmap(store, "dog").shape == (64, 64)


def test_two_pipeline_calls_are_not_joined(sd_pipe, run):
    """A store of two generations: trajectory (and so auc), compare and heatmap(method="daam") refuse to join them
    unless told which; with generation= each is the trajectory of that pipeline call alone."""
    with probe(sd_pipe, dtype=torch.float32) as two:
        run(sd_pipe, "a picture of dog", num_inference_steps=2)
        run(sd_pipe, "a picture of dog", num_inference_steps=3, seed=1)
    with probe(sd_pipe, dtype=torch.float32) as alone:
        run(sd_pipe, "a picture of dog", num_inference_steps=3, seed=1)
    assert [c.generation for c in two.calls] == [0, 0, 1, 1, 1]
    with pytest.raises(StoreError, match=r"2 pipeline calls \(generation 0: 2 calls, generation 1: 3 calls\).*"
                                         r"generation= one of \[0, 1\]"):
        trajectory(two, "dog")
    with pytest.raises(StoreError, match="generation="):
        compare(alone, two, "dog")
    with pytest.raises(SelectionError, match=r"generations \[0, 1\]"):
        trajectory(two, "dog", generation=2)
    second = trajectory(two, "dog", generation=1)
    assert second.shape == (3,) and close(second, trajectory(alone, "dog"))
    assert trajectory(two, "dog", generation=0, by_site=True).shape == (2, len(two.sites))
    assert auc(second) == pytest.approx(auc(trajectory(alone, "dog")))
    result = compare(alone, two, "dog", other_generation=1)
    assert close(result.delta, torch.zeros(3)) and result.delta_auc == pytest.approx(0, abs=1e-7)
    with pytest.raises(StoreError, match="calls: 3 vs 2"):
        compare(alone, two, "dog", other_generation=0)
    assert torch.allclose(heatmap(two, "dog", generation=1), heatmap(alone, "dog"))
    assert heatmap(two, "dog").shape == (64, 64)  # the default method's mean over every call, as before
