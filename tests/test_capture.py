"""Capture-time reductions and the streamed store: each reduced store equals the same reduction of a full store;
a streamed store equals the in-memory one; a compiled denoiser gives the same maps and does not recompile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors
import torch

import attnprobe
from attnprobe import AttentionStore, probe, trajectory
from attnprobe.errors import ConceptError, ProbeError, StoreError
from attnprobe.testing import tiny_sd_pipeline

PROMPTS = ["a picture of dog", "Please forget anything about dog. Please help me generate a picture of dog."]


@pytest.fixture(scope="module")
def full(sd_pipe):
    """A 4-step capture of two prompts with every option at its default but fp32 maps (exact comparisons)."""
    return _capture(sd_pipe)


def _capture(pipe, prompt=PROMPTS, steps=4, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    with probe(pipe, **kwargs) as store:
        latents = pipe(prompt, num_inference_steps=steps, height=64, width=64, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    return store, latents


def _equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and torch.equal(a, b), (a.shape, b.shape, (a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------------- calls
@pytest.mark.parametrize("calls, kept", [([0, 2], [0, 2]), (slice(1, None, 2), [1, 3]), (3, [3]),
                                         (range(2), [0, 1])])
def test_calls_equal_the_same_calls_of_a_full_store(sd_pipe, full, calls, kept):
    store, latents = _capture(sd_pipe, calls=calls)
    _equal(latents, full[1])  # images untouched by skipping
    assert [c.index for c in store.calls] == kept
    assert [c.timestep for c in store.calls] == [full[0].calls[i].timestep for i in kept]
    for site in store.site_names:
        _equal(store[site], full[0][site][kept])


def test_calls_predicate_on_timestep_and_per_generation_index(sd_pipe, full):
    late = {c.timestep for c in full[0].calls if c.timestep < 500}
    with probe(sd_pipe, dtype=torch.float32, calls=lambda i, t: t < 500) as store:
        for _ in range(2):  # two pipeline calls: indices restart at 0 in each
            sd_pipe(PROMPTS, num_inference_steps=4, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
    assert {c.timestep for c in store.calls} == late and len(store.calls) == 2 * len(late)
    assert [c.generation for c in store.calls] == [0] * len(late) + [1] * len(late)
    site = store.site_names[0]
    kept = [i for i, c in enumerate(full[0].calls) if c.timestep < 500]
    _equal(store[site][: len(kept)], full[0][site][kept])


def test_calls_that_keep_nothing_raise_after_restoring(sd_pipe, processors_of, assert_clean):
    before = processors_of(sd_pipe)
    with pytest.raises(ProbeError, match=r"kept none of the 4 denoiser calls.*0\.\.3"):
        _capture(sd_pipe, calls=[10])
    assert_clean(sd_pipe, before)


@pytest.mark.parametrize("calls, match", [([], "keeps no denoiser call"), ([-1], "negative"),
                                          (slice(0, 4, 0), "cannot be 0"), ("late", "not a denoiser-call"),
                                          (True, "not a denoiser-call")])
def test_bad_calls_raise_before_anything_runs(sd_pipe, calls, match):
    with pytest.raises(ProbeError, match=match):
        with probe(sd_pipe, calls=calls):
            raise AssertionError("the block must not run")


# ---------------------------------------------------------------------------------------------- tokens
def test_tokens_concept_keeps_its_positions_in_every_sample(sd_pipe, full):
    store, _ = _capture(sd_pipe, tokens="dog", passes="all")
    ref_store, _ = _capture(sd_pipe, passes="all")
    wanted = sorted({p for s in (2, 3) for occ in ref_store.token_indices(s, "dog") for p in occ})
    assert store.token_positions == wanted and len(wanted) == 3  # "dog" once in prompt 0, twice in prompt 1
    for site in store.site_names:
        _equal(store[site], ref_store[site][..., wanted])
    assert store.tokens(3) == [ref_store.tokens(3)[p] for p in wanted]
    # analysis follows the kept positions: same trajectories as from the full store
    for sample in (2, 3):
        for occurrence in ("all", -1):
            _equal(trajectory(store, "dog", sample, occurrence=occurrence),
                   trajectory(ref_store, "dog", sample, occurrence=occurrence))
    with pytest.raises(ConceptError, match="kept only positions"):
        store.token_indices(3, "picture")
    assert store.meta["capture"]["tokens"] == ["dog"]


def test_tokens_concept_missing_from_some_prompts_warns(sd_pipe):
    """The token axis keeps the union of every sample's occurrences: a conditional prompt without the concept then
    holds other words there, which the probe now says (negative prompts are not counted)."""
    with pytest.warns(UserWarning, match=r"tokens='dog' is not in the prompt of sample\(s\) \[3\] \(e\.g\. 'a red car'\)"):
        store, _ = _capture(sd_pipe, prompt=["a picture of dog", "a red car"], steps=1, tokens="dog", passes="all")
    assert store.tokens(3) != store.tokens(2)


def test_tokens_positions_and_combined_reductions(sd_pipe, full):
    base, _ = full
    store, _ = _capture(sd_pipe, tokens=[0, -1], heads="mean", calls=[1, 2], dtype=torch.float32)
    assert store.token_positions == [0, 76] and len(store.tokens(0)) == 2
    for site in store.site_names:
        _equal(store[site], base[site][[1, 2]][..., [0, 76]].mean(dim=2, keepdim=True))
    # numpy's ints and int arrays, as an analysis hands them on, select the same
    numpy_store, _ = _capture(sd_pipe, tokens=np.array([0, -1]), heads="mean", calls=np.arange(1, 3),
                              dtype=torch.float32)
    assert numpy_store.token_positions == [0, 76] and [c.index for c in numpy_store.calls] == [1, 2]
    for site in store.site_names:
        _equal(numpy_store[site], store[site])


def test_tokens_absent_concept_raises_before_any_map(sd_pipe, processors_of, assert_clean):
    before = processors_of(sd_pipe)
    with pytest.raises(ConceptError, match="'cat'.*none of this call's prompts"):
        _capture(sd_pipe, tokens="cat")
    assert_clean(sd_pipe, before)


@pytest.mark.parametrize("tokens", [[], [1, "dog"], 3.5, [" "], np.arange(3.0), np.array([[1, 2]])])
def test_bad_tokens_raise_before_anything_runs(sd_pipe, tokens):
    with pytest.raises(ProbeError, match="not a token selection"):
        with probe(sd_pipe, tokens=tokens):
            raise AssertionError("the block must not run")


def test_token_position_out_of_range(sd_pipe):
    with pytest.raises(ProbeError, match=r"positions \[77\] are outside the 77 text tokens"):
        _capture(sd_pipe, tokens=[77])


# ---------------------------------------------------------------------------------------------- aggregate
@pytest.mark.parametrize("how", ["sum", "mean"])
def test_aggregate_equals_the_reduction_of_a_full_store(sd_pipe, full, how):
    base, latents = full
    store, out = _capture(sd_pipe, aggregate=how, calls=[1, 2, 3])
    _equal(out, latents)
    assert store.aggregate == how and [c.index for c in store.calls] == [1, 2, 3]
    for site in store.site_names:
        ref = getattr(base[site][[1, 2, 3]], how)(dim=0, keepdim=True)
        torch.testing.assert_close(store[site], ref, rtol=1e-6, atol=1e-7)
    # a heat map of the aggregate is the heat map of its calls (mean over calls either way)
    if how == "mean":
        torch.testing.assert_close(attnprobe.heatmap(store, "dog", 1), attnprobe.heatmap(base, "dog", 1, calls=[1, 2, 3]))
    with pytest.raises(StoreError, match="needs a map per denoiser call"):
        trajectory(store, "dog", 0)


def test_aggregate_round_trips_through_save(sd_pipe, tmp_path):
    store, _ = _capture(sd_pipe, aggregate="mean", heads="mean")
    back = AttentionStore.load(store.save(tmp_path / "agg.safetensors"))
    assert back.aggregate == "mean" and len(back.calls) == 4
    _equal(back[back.site_names[0]], store[store.site_names[0]])
    assert back.to_xarray().sizes["call"] == 1


def test_bad_aggregate(sd_pipe):
    with pytest.raises(ProbeError, match="aggregate='median' is not one of None, 'sum', 'mean'"):
        with probe(sd_pipe, aggregate="median"):
            pass


# ---------------------------------------------------------------------------------------------- memory
def test_store_bytes_are_the_kept_values(sd_pipe):
    store, _ = _capture(sd_pipe, tokens="dog", heads="mean", dtype=torch.float16)
    values = sum(store[s].numel() for s in store)
    assert store.nbytes == values * 2
    held = {id(store[s].untyped_storage()): store[s].untyped_storage().nbytes() for s in store}
    assert sum(held.values()) <= 1.05 * store.nbytes  # no view keeps a larger tensor alive


# ---------------------------------------------------------------------------------------------- streaming
def test_streamed_store_equals_in_memory_store(sd_pipe, full, tmp_path):
    base, latents = full
    store, out = _capture(sd_pipe, stream_to=tmp_path / "s", passes="all")
    mem, _ = _capture(sd_pipe, passes="all")
    _equal(out, latents)
    assert store.folder == tmp_path / "s" and len(list((tmp_path / "s" / "calls").iterdir())) == 4
    back = AttentionStore.load(tmp_path / "s")
    for s in (store, back):
        assert s.calls == mem.calls and s.samples == mem.samples and s.site_names == mem.site_names
        assert s.meta["complete"] is True and s.nbytes == mem.nbytes
        for site in mem.site_names:
            _equal(s[site], mem[site])
        _equal(trajectory(s, "dog", 3, occurrence=-1), trajectory(mem, "dog", 3, occurrence=-1))
        _equal(s.maps(mem.site_names[0], calls=[3, 1], samples=[2], tokens=[6, 4]),
               mem[mem.site_names[0]][[3, 1]][:, [2]][..., [6, 4]])
    with pytest.raises(IndexError, match="token positions \\[77\\] are out of range: the token axis has 77"):
        back.maps(mem.site_names[0], tokens=[77])


def test_streamed_slice_reads_only_its_token_rows(sd_pipe, tmp_path, monkeypatch):
    store, _ = _capture(sd_pipe, stream_to=tmp_path / "s")
    whole = sum(store[s].numel() for s in store.site_names)
    real, read = safetensors.safe_open, []

    class Spy:  # counts the values each read returns; whole-tensor reads are refused
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            raise AssertionError("a slice must not read whole tensors")

        def get_slice(self, name):
            sl = self.f.get_slice(name)

            class Slice:
                def __getitem__(self, index):
                    out = sl[index]
                    read.append(out.numel())
                    return out

            return Slice()

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    assert trajectory(store, "dog", 0).shape == (4,)
    assert sum(read) * 77 == whole  # "dog" is one token: 1/77 of the store is read


def test_streaming_keeps_finished_calls_when_the_run_dies(sd_pipe, tmp_path, processors_of, assert_clean):
    before = processors_of(sd_pipe)

    def stop(pipe, i, t, kwargs):
        if i == 2:
            raise KeyboardInterrupt
        return kwargs

    with pytest.raises(KeyboardInterrupt):
        with probe(sd_pipe, stream_to=tmp_path / "s", dtype=torch.float32):
            sd_pipe(PROMPTS[0], num_inference_steps=4, height=64, width=64, output_type="latent",
                    callback_on_step_end=stop)
    assert_clean(sd_pipe, before)
    back = AttentionStore.load(tmp_path / "s")
    assert [c.index for c in back.calls] == [0, 1, 2] and back.meta["complete"] is False
    assert back[back.site_names[0]].shape[0] == 3


def test_stream_to_a_folder_in_use_is_refused(sd_pipe, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "mine.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty.*never overwritten"):
        with probe(sd_pipe, stream_to=tmp_path / "s"):
            raise AssertionError("the block must not run")
    assert (tmp_path / "s" / "mine.txt").read_text() == "keep me"
    with pytest.raises(StoreError, match="without attnprobe.json"):
        AttentionStore.load(tmp_path / "s")


def test_streamed_aggregate(sd_pipe, tmp_path):
    mem, _ = _capture(sd_pipe, aggregate="sum")
    store, _ = _capture(sd_pipe, aggregate="sum", stream_to=tmp_path / "s")
    back = AttentionStore.load(tmp_path / "s")
    assert back.aggregate == "sum" and back.calls == mem.calls
    for site in mem.site_names:
        _equal(back[site], mem[site])


# ---------------------------------------------------------------------------------------------- torch.compile
def test_compiled_denoiser_same_maps_and_no_recompile_after_warm_up():
    """``torch.compile`` (dynamo's eager backend: the tracing and guards are what can go wrong, not the kernels)."""
    from diffusers import UNet2DConditionModel

    pipe = tiny_sd_pipeline(seed=0)
    torch.manual_seed(0)  # a smaller UNet (4 sites, 2 levels) than SD 1.5's layout: dynamo traces it 5× faster
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
        sample_size=8, norm_num_groups=8).eval()
    eager, eager_latents = _capture(pipe, PROMPTS[0], steps=3, heads="mean")
    torch._dynamo.reset()
    pipe.unet.compile(backend="eager")
    try:
        _capture(pipe, PROMPTS[0], steps=3, heads="mean")  # warm-up: compiles
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled, latents = _capture(pipe, PROMPTS[0], steps=3, heads="mean")
            _capture(pipe, PROMPTS[0], steps=3, heads="mean", calls=[0, 1, 2])
    finally:
        torch._dynamo.reset()
    _equal(latents, eager_latents)
    for site in eager.site_names:
        torch.testing.assert_close(compiled[site], eager[site], rtol=0, atol=1e-6)
    assert math.isfinite(compiled.calls[-1].timestep)


# ---------------------------------------------------------------------------------------------- device copies
def test_call_sink_hands_on_copies_in_order_and_waits_only_past_the_limit():
    """The GPU path's queue, with fake CUDA events: calls reach the store in call order; a call whose copy is
    still running is not waited for until more than ``IN_FLIGHT`` calls are in flight; ``close`` waits for all."""
    from attnprobe.capture.sink import IN_FLIGHT, CallSink
    from attnprobe.store import Call, Site, StoreWriter

    class Event:
        def __init__(self):
            self.done, self.waited = False, False

        def query(self):
            return self.done

        def synchronize(self):
            self.waited = True

    writer = StoreWriter([Site("s", "cross", 1, 1, "up", "up_blocks.0")], {})
    store = writer.store
    sink = CallSink(writer, torch.device("cpu"), None)
    events = []
    for i in range(IN_FLIGHT + 2):
        events.append(Event())
        sink.pending.append((events[-1], Call(i, 1000.0 - i, 0, ("cond",)), {"s": torch.full((1, 1, 1, 1, 2), i)}))
        sink.drain(IN_FLIGHT)
    assert [c.index for c in store.calls] == [0, 1]  # waited for the two oldest, once 3 and then 4 were in flight
    assert [e.waited for e in events] == [True, True, False, False]
    events[2].done = True
    sink.drain(IN_FLIGHT)  # a finished copy is handed on without waiting for anything else
    assert [c.index for c in store.calls] == [0, 1, 2] and not events[3].waited
    sink.close(torch.float16, ("cond",))
    assert [c.index for c in store.calls] == [0, 1, 2, 3]
    assert store["s"][:, 0, 0, 0, 0, 0].tolist() == [0, 1, 2, 3]
    assert not store["s"].is_pinned()


# ---------------------------------------------------------------------------------------------- found by breaking
def test_a_call_that_failed_after_encoding_does_not_label_the_next(sd_pipe):
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="latent")
    with probe(sd_pipe, heads="mean", tokens="dog") as store:
        with pytest.raises(ValueError):  # DDIM takes no custom sigmas: raised after the prompt was encoded
            sd_pipe("a picture of cat and dog", sigmas=[1.0, 0.5], **kwargs)
        sd_pipe("a picture of dog", generator=torch.Generator().manual_seed(0), **kwargs)
    ref, _ = _capture(sd_pipe, "a picture of dog", steps=2, heads="mean", tokens="dog", dtype=torch.float16)
    assert store.samples[0].text == "a picture of dog" and store.token_positions == ref.token_positions
    _equal(trajectory(store, "dog"), trajectory(ref, "dog"))


def test_a_streamed_store_with_a_missing_twice_or_foreign_shard_is_refused(sd_pipe, tmp_path):
    import shutil

    _capture(sd_pipe, stream_to=tmp_path / "s", steps=3)
    calls = tmp_path / "s" / "calls"
    shutil.copy(calls / "00000001.safetensors", tmp_path / "keep.safetensors")
    (calls / "00000001.safetensors").unlink()
    with pytest.raises(StoreError, match=r"lacks 1 of the 3 calls its header lists: shards \[1\] .*denoiser calls \[1\]"):
        AttentionStore.load(tmp_path / "s")
    with pytest.warns(UserWarning, match="missing_calls='skip'"):
        assert [c.index for c in AttentionStore.load(tmp_path / "s", missing_calls="skip").calls] == [0, 2]
    shutil.copy(tmp_path / "keep.safetensors", calls / "00000001.safetensors")
    shutil.copy(calls / "00000000.safetensors", calls / "00000000 (copy).safetensors")
    with pytest.raises(StoreError, match="renamed or copied"):
        AttentionStore.load(tmp_path / "s")
    (calls / "00000000 (copy).safetensors").unlink()
    _capture(sd_pipe, stream_to=tmp_path / "other", steps=3, passes="all")
    shutil.copy(tmp_path / "other" / "calls" / "00000001.safetensors", calls / "00000001.safetensors")
    with pytest.raises(StoreError, match="a shard of another store"):
        AttentionStore.load(tmp_path / "s")
    store, _ = _capture(sd_pipe, steps=3)
    (calls / "00000001.safetensors").unlink()
    store.save(calls / "00000001.safetensors")
    with pytest.raises(StoreError, match="without an attnprobe call record"):
        AttentionStore.load(tmp_path / "s")


def test_maps_takes_ints_slices_and_refuses_non_ints(full):
    store, _ = full
    site = store.site_names[0]
    _equal(store.maps(site, calls=1), store[site][[1]])
    _equal(store.maps(site, calls=slice(0, None, 2)), store[site][[0, 2]])
    with pytest.raises(TypeError, match="must be ints"):
        store.maps(site, calls=[0.7])


def test_a_probe_that_fails_to_open_leaves_no_folder(sd_pipe, tmp_path):
    with pytest.raises(ProbeError):
        with probe(sd_pipe.unet, prompts=["a"], stream_to=tmp_path / "s"):
            pass
    assert not (tmp_path / "s").exists()
