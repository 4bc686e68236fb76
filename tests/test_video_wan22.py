"""Wan 2.2 text-to-video's two experts (``WanPipeline`` with ``transformer_2`` and ``boundary_ratio``): one store holds
every denoiser call of the pipeline call, each from the expert that ran it (``store.meta["experts"]``), on the tiny
pipeline (``tiny_pipeline("wan2.2")``: a 4-step call runs ``transformer`` for two steps, ``transformer_2`` for two).

The float64 reference never touches attnprobe: our own pre-forward hooks on each expert keep each ``attn2``'s inputs,
and ``test_video.reference`` recomputes q and k from a float64 copy of that expert's projections and norms.
"""

from __future__ import annotations

import pytest
import torch

import attnprobe
from attnprobe.errors import ProbeError
from attnprobe.store import AttentionStore
from attnprobe.testing import tiny_pipeline
from test_families import Inputs
from test_video import reference

PROMPT = "a dog running on grass"
VIDEO = dict(num_frames=5, height=32, width=32, num_inference_steps=4, max_sequence_length=16, output_type="pt")
EXPERTS = ("transformer", "transformer_2")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("wan2.2")


def generate(pipe, **kwargs):
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **{**VIDEO, **kwargs}).frames


def _attn2(pipe):
    return {(e, n): m.processor for e in EXPERTS for n, m in getattr(pipe, e).named_modules() if n.endswith("attn2")}


@pytest.fixture(scope="module")
def probed(pipe):
    """The frames without and with a probe of each pass, the stores, our own inputs of every site per expert, the
    expert of each pipeline denoiser call, and the processors before."""
    plain = generate(pipe)
    before = _attn2(pipe)
    sites = [s.name for s in attnprobe.list_sites(pipe)]
    order: list[str] = []
    hooks = [getattr(pipe, e).register_forward_pre_hook(lambda *a, e=e: order.append(e)) for e in EXPERTS]
    try:
        with Inputs(pipe.transformer, sites) as first, Inputs(pipe.transformer_2, sites) as second, \
                attnprobe.probe(pipe, dtype=torch.float32) as cond, \
                attnprobe.probe(pipe, passes="uncond", dtype=torch.float32) as uncond:
            frames = generate(pipe)
    finally:
        for h in hooks:
            h.remove()
    return plain, frames, {"cond": cond, "uncond": uncond}, {"transformer": first.seen, "transformer_2": second.seen}, \
        order, before


def test_frames_unchanged_and_processors_restored(pipe, probed):
    plain, frames, _, _, _, before = probed
    assert torch.equal(plain, frames)  # the decoded video, bit for bit
    assert _attn2(pipe) == before  # both experts' processors, the very objects
    assert len(before) == 4


@pytest.mark.parametrize("passes", ["cond", "uncond"])
def test_each_call_from_the_expert_that_ran_it(pipe, probed, passes):
    _, _, stores, seen, order, _ = probed
    store = stores[passes]
    assert order == ["transformer"] * 4 + ["transformer_2"] * 4  # two steps each, a call per pass
    assert [c.index for c in store.calls] == ([0, 2, 4, 6] if passes == "cond" else [1, 3, 5, 7])
    experts = store.meta["experts"]
    assert experts["names"] == list(EXPERTS) and experts["boundary_ratio"] == 0.7
    assert experts["boundary_timestep"] == 700.0
    assert {int(i): e for i, e in experts["calls"].items()} == {c.index: order[c.index] for c in store.calls}
    boundary = experts["boundary_timestep"]
    assert all((c.timestep >= boundary) == (order[c.index] == "transformer") for c in store.calls)
    checks = [store.meta["processor_check"], experts["processor_check"]["transformer_2"]]
    assert all(len(c) == 2 and all(v["verdict"] == "equal" for v in c.values()) for c in checks)  # once per expert
    for site in store.sites:
        maps = store[site.name]
        for c, call in enumerate(store.calls):
            expert = order[call.index]
            nth = order[:call.index].count(expert)  # that expert's own call count
            attn = getattr(pipe, expert).get_submodule(site.name)
            ref = reference("wan", attn, seen[expert][site.name][nth])[0]  # one row per separate call
            got = maps[c, 0].flatten(1, 3).double()
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
            other = getattr(pipe, "transformer_2" if expert == "transformer" else "transformer").get_submodule(site.name)
            assert not torch.allclose(got, reference("wan", other, seen[expert][site.name][nth])[0], atol=1e-4)


def test_expert_record_saved_and_loaded(probed, tmp_path):
    store = probed[2]["cond"]
    store.save(tmp_path / "s")
    loaded = AttentionStore.load(tmp_path / "s")
    assert loaded.meta["experts"] == store.meta["experts"]


def test_one_expert_alone_is_refused(pipe):
    for name in EXPERTS:
        with pytest.raises(ProbeError, match=rf"WanPipeline\.{name}, one of Wan 2\.2's two experts"):
            with attnprobe.probe(getattr(pipe, name)) as store:
                generate(pipe, num_inference_steps=2)
        assert store.calls == []
    assert not any("Probe" in type(p).__name__ for p in _attn2(pipe).values())


def test_experts_with_other_sites_or_classes_are_refused(pipe):
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    second = pipe.transformer_2
    try:
        pipe.transformer_2 = WanTransformer3DModel(**{**config, "num_layers": 1}).eval()
        with pytest.raises(ProbeError, match=r"different cross-attention sites \(2 in transformer, 1 in transformer_2"):
            attnprobe.probe(pipe).__enter__()
        pipe.transformer_2 = torch.nn.Linear(2, 2)
        with pytest.raises(ProbeError, match="transformer_2 .* is a Linear"):
            attnprobe.probe(pipe).__enter__()
    finally:
        pipe.transformer_2 = second
    assert not any("Probe" in type(p).__name__ for p in _attn2(pipe).values())


def test_an_expert_replaced_inside_the_probe_is_refused(pipe):
    """pipe.transformer_2 swapped inside the probe: its calls would run unhooked and the store miss them without a
    word; the probe refuses at its next call (or at the end) and says the store is incomplete."""
    import copy

    original = pipe.transformer_2
    try:
        with pytest.raises(attnprobe.ProbeError, match="transformer_2 was replaced during the probe"):
            with attnprobe.probe(pipe, heads="mean") as store:
                pipe.transformer_2 = copy.deepcopy(original)
                pipe(prompt="a dog", num_frames=5, height=32, width=32, num_inference_steps=4,
                     max_sequence_length=16, guidance_scale=1.0, output_type="latent")
        assert not store.meta["complete"]
    finally:
        pipe.transformer_2 = original
    only = copy.copy(pipe)
    only.transformer = None
    with pytest.raises(attnprobe.NoSitesError, match="has only its transformer_2"):
        attnprobe.probe(only).__enter__()


def test_aggregate_stream_and_calls_across_the_two_experts(pipe, probed, tmp_path):
    """aggregate=, stream_to= and calls= on a pipeline call that switches experts (untested before): the streamed
    store and the kept calls hold the full store's values bit for bit, with each call's expert; the aggregate is the
    mean of every call, from both experts."""
    full = probed[2]["cond"]
    with attnprobe.probe(pipe, dtype=torch.float32, aggregate="mean") as agg, \
            attnprobe.probe(pipe, dtype=torch.float32, stream_to=tmp_path / "s") as streamed, \
            attnprobe.probe(pipe, dtype=torch.float32, calls=[2, 4]) as some:
        generate(pipe)
    loaded = AttentionStore.load(tmp_path / "s")
    experts = full.meta["experts"]["calls"]
    assert loaded.meta["experts"]["calls"] == streamed.meta["experts"]["calls"] == experts
    assert [c.index for c in some.calls] == [2, 4]
    assert {int(i): e for i, e in some.meta["experts"]["calls"].items()} == {2: "transformer", 4: "transformer_2"}
    assert {int(i) for i in agg.meta["experts"]["calls"]} == {0, 2, 4, 6}
    for site in full.site_names:
        assert torch.equal(loaded[site], full[site])
        assert torch.equal(some[site], full[site][1:3])  # calls 2 and 4 are the full store's second and third
        torch.testing.assert_close(agg[site][0], full[site].mean(0), rtol=1e-6, atol=1e-7)
