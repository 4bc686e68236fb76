"""probe() and the recording processors on tiny SD / SDXL pipelines: images unchanged, maps equal an
independent recompute, restore in every exit path, batch layout, call counting, grids, generations."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import attnprobe
from attnprobe import ConceptError, NoDenoiserCallError, NoSitesError, ProbeError, SampleLayoutError, probe
from attnprobe.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

probe_module = importlib.import_module("attnprobe.capture.recorder")

MID = "mid_block.attentions.0.transformer_blocks.0.attn2"
FIRST = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def site_names(pipe):
    return [s.name for s in attnprobe.list_sites(pipe)]


# ------------------------------------------------------------------ 1. images are bit-identical
@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_images_bit_identical_with_probe(make, dtype, run, assert_clean):
    pipe = make(seed=0, dtype=dtype)
    plain = run(pipe, "a picture of dog", output_type="pt").images
    with probe(pipe, passes="all", heads="keep") as store:
        probed = run(pipe, "a picture of dog", output_type="pt").images
    assert (plain - probed).abs().max().item() == 0.0
    assert torch.equal(plain, probed)
    assert len(store.calls) == 2 and len(store.samples) == 2
    assert all(torch.isfinite(store[n].float()).all() for n in store)
    assert_clean(pipe)


def test_images_bit_identical_cond_mean_subset(sd_pipe, run):
    plain = run(sd_pipe, output_type="pt", guidance_scale=5.0).images
    with probe(sd_pipe, sites="up_blocks.*", passes="cond", heads="mean", dtype=torch.float16) as store:
        probed = run(sd_pipe, output_type="pt", guidance_scale=5.0).images
    assert torch.equal(plain, probed)
    assert all(n.startswith("up_blocks.") for n in store) and len(store) == 9
    assert store[store.site_names[0]].dtype == torch.float16


# ------------------------------------------------------------------ 2. maps = softmax(q·kᵀ·scale)
@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_maps_equal_independent_recompute(which, sd_pipe, sdxl_pipe, run, attn_inputs, check_maps):
    pipe = sd_pipe if which == "sd" else sdxl_pipe
    names = site_names(pipe)
    with attn_inputs(pipe.unet, names) as seen:
        with probe(pipe, passes="all", heads="keep", dtype=torch.float32) as store:
            run(pipe, "a picture of dog", negative_prompt="blurry")
    assert check_maps(store, seen) <= 1e-6


def test_maps_equal_recompute_with_classic_attn_processor(sd_pipe, run, attn_inputs, check_maps, processors_of):
    saved = sd_pipe.unet.attn_processors
    before = processors_of(sd_pipe)
    sd_pipe.unet.set_attn_processor(AttnProcessor())
    try:
        classic = processors_of(sd_pipe)
        with attn_inputs(sd_pipe.unet, site_names(sd_pipe)) as seen:
            with probe(sd_pipe, passes="all", dtype=torch.float32) as store:
                run(sd_pipe)
        check_maps(store, seen)
        assert processors_of(sd_pipe) == classic  # the classic processors are back, not the defaults
    finally:
        sd_pipe.unet.set_attn_processor(saved)
    assert processors_of(sd_pipe) == before


def test_maps_heads_mean_equal_recompute(sd_pipe, run, attn_inputs, check_maps):
    with attn_inputs(sd_pipe.unet, [FIRST, MID]) as seen:
        with probe(sd_pipe, sites=[FIRST, MID], passes="all", heads="mean", dtype=torch.float32) as store:
            run(sd_pipe)
    assert store[FIRST].shape[2] == 1
    check_maps(store, seen)


@pytest.mark.parametrize("boolean", [False, True], ids=["float-mask", "bool-mask"])
def test_maps_with_encoder_attention_mask(sd_pipe, attn_inputs, check_maps, boolean):
    unet = sd_pipe.unet
    torch.manual_seed(0)
    latents, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    mask = torch.zeros(2, 77)
    mask[0, :5], mask[1, :9] = 1, 1
    with attn_inputs(unet, [FIRST, MID]) as seen:
        with probe(unet, sites=[FIRST, MID], dtype=torch.float32) as store:
            unet(latents, torch.tensor(10), encoder_hidden_states=states,
                 encoder_attention_mask=mask.bool() if boolean else mask)
    assert seen.inputs[FIRST][0][2] is not None  # the mask really reached attn2
    check_maps(store, seen)
    assert store[FIRST][:, 0, ..., 5:].max() == 0 and store[FIRST][:, 1, ..., 9:].max() == 0


# ------------------------------------------------------------------ 3. sums over tokens
@pytest.mark.parametrize("heads", ["keep", "mean"])
def test_maps_sum_to_one_over_tokens(sd_pipe, run, heads):
    with probe(sd_pipe, passes="all", heads=heads, dtype=torch.float32) as store:
        run(sd_pipe)
    for name in store:
        assert torch.allclose(store[name].sum(dim=-1), torch.ones(()), atol=1e-5), name
        assert store[name].min() >= 0


# ------------------------------------------------------------------ 4. restore on every exit
def test_restored_after_normal_exit(sd_pipe, run, assert_clean, processors_of):
    before = processors_of(sd_pipe)
    with probe(sd_pipe) as store:
        run(sd_pipe)
        wrapped = processors_of(sd_pipe)
        assert wrapped[FIRST] is not before[FIRST]
        assert sd_pipe.unet.get_submodule(FIRST).to_q._forward_hooks
    assert_clean(sd_pipe, before)
    assert len(store.calls) == 2


def test_restored_after_exception_in_block(sd_pipe, run, assert_clean, processors_of):
    before = processors_of(sd_pipe)
    with pytest.raises(RuntimeError, match="boom"):  # the user's exception, not a ProbeError
        with probe(sd_pipe):
            run(sd_pipe)
            raise RuntimeError("boom")
    assert_clean(sd_pipe, before)


def test_restored_after_exception_mid_generation(sd_pipe, run, assert_clean, processors_of):
    before = processors_of(sd_pipe)

    def stop(pipe, step, t, kwargs):
        raise KeyError("stop at step 0")

    with pytest.raises(KeyError):
        with probe(sd_pipe) as store:
            run(sd_pipe, num_inference_steps=3, callback_on_step_end=stop)
    assert_clean(sd_pipe, before)
    assert len(store.calls) == 1 and store[FIRST].shape[0] == 1


def test_restored_when_install_fails(sd_pipe, monkeypatch, assert_clean, processors_of):
    before = processors_of(sd_pipe)
    real, count = probe_module.wrap_processor, [0]

    def flaky(*args, **kwargs):
        count[0] += 1
        if count[0] == 5:
            raise RuntimeError("install failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_module, "wrap_processor", flaky)
    with pytest.raises(RuntimeError, match="install failed"):
        with probe(sd_pipe):
            pass
    assert_clean(sd_pipe, before)


def test_no_denoiser_call_raises_and_restores(sd_pipe, assert_clean, processors_of):
    before = processors_of(sd_pipe)
    with pytest.raises(NoDenoiserCallError, match="the probe saw no denoiser call: call the pipeline inside"):
        with probe(sd_pipe):
            pass
    assert_clean(sd_pipe, before)
    assert issubclass(NoDenoiserCallError, ProbeError)  # except ProbeError keeps catching it



NEVER_EXITED = """
import os, sys, attnprobe
from attnprobe.testing import tiny_sd_pipeline
pipe, other = tiny_sd_pipeline(), tiny_sd_pipeline()
store = attnprobe.probe(pipe, heads="mean", stream_to=sys.argv[1]).__enter__()  # the block object is not kept
pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
block = attnprobe.probe(other, heads="mean", stream_to=sys.argv[2])
block.__enter__()
other("a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
go, wait = os.pipe()
if os.fork() == 0:  # a forked child (a data-loader worker) that exits after its parent closed the probe
    os.read(go, 1)
    sys.exit(0)
block.__exit__(None, None, None)
os.write(wait, b"x")
os.wait()
go, wait = os.pipe()
with attnprobe.probe(other, heads="mean", stream_to=sys.argv[3]):
    other("a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
    child = os.fork()
    if child == 0:  # leaves the block after its parent did
        os.read(go, 1)
if child == 0:
    os._exit(0)
os.write(wait, b"x")
os.waitpid(child, 0)
"""


def test_a_probe_never_exited_is_closed_at_interpreter_exit(tmp_path):
    # left to the interpreter's teardown, the probe's generator ran torch after torch's clean-up: a C++ abort; a probe
    # whose block object was not kept was closed by the garbage collector at once; a forked child's exit rewrote the
    # parent's store as interrupted
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", NEVER_EXITED, *(str(tmp_path / n) for n in ("open", "closed", "left"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("was entered and never exited: closed at interpreter exit") == 1, done.stderr[-2000:]
    assert f"2 call(s), streamed to {tmp_path / 'open'})" in done.stderr
    kept = attnprobe.AttentionStore.load(tmp_path / "open")
    assert len(kept.calls) == 2 and kept.meta["complete"] is False  # its streamed calls are whole
    for name in ("closed", "left"):  # neither a forked child's exit nor its leaving the block wrote the store
        closed = attnprobe.AttentionStore.load(tmp_path / name)
        assert len(closed.calls) == 2 and closed.meta["complete"] is True
    assert "its block, left in a forked child" in done.stderr


def test_a_probe_left_open_is_closed_at_exit_also_where_warnings_are_errors(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    errors = "import warnings, attnprobe\nwarnings.simplefilter('error', attnprobe.AttnprobeWarning)\n"
    done = subprocess.run([sys.executable, "-c", errors + NEVER_EXITED.split("block = ")[0], str(tmp_path / "open")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]
    assert "attnprobe: a probe (" in done.stderr and "closed at interpreter exit" in done.stderr  # said on stderr
    assert len(attnprobe.AttentionStore.load(tmp_path / "open").calls) == 2


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(passes="both"), "passes"),
        (dict(heads="max"), "heads"),
        (dict(dtype=torch.int8), "dtype"),
        (dict(device="warp-drive"), "device"),
        (dict(prompts=3), "prompts"),
    ],
)
def test_bad_options_raise_probe_error(sd_pipe, options, match, assert_clean):
    with pytest.raises(ProbeError, match=match):
        with probe(sd_pipe, **options):
            pass
    assert_clean(sd_pipe)


def test_denoiser_without_cross_attention_raises():
    with pytest.raises(NoSitesError):
        with probe(torch.nn.Linear(2, 2)):
            pass


# ------------------------------------------------------------------ 5. slicing / fused QKV
def test_slicing_inside_block_raises_and_restores(sd_pipe, run, assert_clean, processors_of):
    saved, before = sd_pipe.unet.attn_processors, processors_of(sd_pipe)
    try:
        with pytest.raises(ProbeError, match="attention slicing") as info:
            with probe(sd_pipe):
                sd_pipe.enable_attention_slicing()
                run(sd_pipe)
        assert "before opening the probe" in str(info.value) and FIRST in str(info.value)
        assert_clean(sd_pipe)  # no wrapper or hook left; the slicing the user asked for stays
    finally:
        sd_pipe.unet.set_attn_processor(saved)
    assert processors_of(sd_pipe) == before


def test_fused_qkv_inside_block_raises_and_restores(run, assert_clean):
    pipe = tiny_sd_pipeline(seed=0)
    with pytest.raises(ProbeError, match="fuse_qkv_projections"):
        with probe(pipe):
            pipe.fuse_qkv_projections()
            run(pipe)
    assert_clean(pipe)


def test_unfuse_after_probe_gives_a_working_pipeline(run):
    pipe = tiny_sd_pipeline(seed=0)
    with pytest.raises(ProbeError):
        with probe(pipe):
            pipe.fuse_qkv_projections()
            run(pipe)
    pipe.unfuse_qkv_projections()
    run(pipe)  # raises ProbeError: "the installed processor AttnProcessor2_0 did not call attn.to_q"


def test_replaced_processor_message_names_the_calls_kept(sd_pipe, run):
    saved = sd_pipe.unet.attn_processors
    try:
        with pytest.raises(ProbeError) as info:
            with probe(sd_pipe) as store:
                run(sd_pipe)
                sd_pipe.enable_attention_slicing()
                run(sd_pipe)
    finally:
        sd_pipe.unet.set_attn_processor(saved)
    assert len(store.calls) == 2
    assert "calls 0..1" in str(info.value)


def test_slicing_before_probe_maps_and_images(sd_pipe, run, attn_inputs, check_maps, processors_of):
    saved, before = sd_pipe.unet.attn_processors, processors_of(sd_pipe)
    sd_pipe.enable_attention_slicing()
    try:
        sliced = processors_of(sd_pipe)
        assert type(sliced[FIRST]).__name__ == "SlicedAttnProcessor"
        plain = run(sd_pipe, output_type="pt").images
        with attn_inputs(sd_pipe.unet, site_names(sd_pipe)) as seen:
            with probe(sd_pipe, passes="all", dtype=torch.float32) as store:
                probed = run(sd_pipe, output_type="pt").images
        assert torch.equal(plain, probed)
        check_maps(store, seen)
        assert processors_of(sd_pipe) == sliced
    finally:
        sd_pipe.unet.set_attn_processor(saved)
    assert processors_of(sd_pipe) == before


# ------------------------------------------------------------------ 6. batch of prompts × images
def test_batch_prompts_and_images_per_prompt(sd_pipe, run, attn_inputs, check_maps):
    prompts = ["a dog", "a red cat"]
    with attn_inputs(sd_pipe.unet, [FIRST, MID]) as seen:
        with probe(sd_pipe, passes="all", dtype=torch.float32) as store:
            run(sd_pipe, prompts, num_images_per_prompt=2)
    expected = [("uncond", i, j, "") for i in range(2) for j in range(2)]
    expected += [("cond", i, j, prompts[i]) for i in range(2) for j in range(2)]
    assert [(s.pass_label, s.prompt_index, s.image_index, s.text) for s in store.samples] == expected
    assert [s.row for s in store.samples] == list(range(8))
    assert all(c.layout == ("uncond",) * 4 + ("cond",) * 4 for c in store.calls)
    assert store.meta["num_images_per_prompt"] == 2 and store.meta["prompts"] == prompts
    for s in store.samples:
        if s.pass_label == "cond" and s.prompt_index == 0:
            assert store.token_indices(s, "dog") == [[2]]
            with pytest.raises(ConceptError):
                store.token_indices(s, "cat")
        elif s.pass_label == "cond":
            assert store.token_indices(s, "cat") == [[3]]
            with pytest.raises(ConceptError, match="dog"):
                store.token_indices(s, "dog")
        else:
            with pytest.raises(ConceptError):
                store.token_indices(s, "dog")
    check_maps(store, seen)  # each sample's map is its own batch row's
    maps = store[FIRST]
    for a in range(8):
        for b in range(a + 1, 8):
            assert not torch.equal(maps[:, a], maps[:, b]), (a, b)


# ------------------------------------------------------------------ 7. negative prompt
def test_negative_prompt_labels_uncond_samples(sd_pipe, run):
    with probe(sd_pipe, passes="all") as store:
        run(sd_pipe, "a cat", negative_prompt="dog")
    uncond, cond = store.samples
    assert (uncond.pass_label, uncond.text, cond.pass_label, cond.text) == ("uncond", "dog", "cond", "a cat")
    assert store.token_indices(uncond, "dog") == [[1]]
    assert store.token_indices(cond, "cat") == [[2]]
    with pytest.raises(ConceptError, match="dog"):
        store.token_indices(cond, "dog")
    # the text shown is the negative prompt's, and the message ends on where the prompt's rows are
    with pytest.raises(ConceptError, match=r"not in sample 0 \(uncond pass, prompt 0\): 'dog'\. .* Sample 0 is a row of "
                                           r"the uncond pass \(its text is not the prompt\); the conditional samples "
                                           r"are \[1\]: pass sample=1$"):
        store.token_indices(uncond, "cat")
    assert store.meta["negative_prompts"] == ["dog"]


def test_passes_uncond_keeps_only_uncond_rows(sd_pipe, run):
    with probe(sd_pipe, passes="uncond") as store:
        run(sd_pipe, ["a dog", "a cat"], negative_prompt=["x", "y"])
    assert [(s.pass_label, s.row, s.text) for s in store.samples] == [("uncond", 0, "x"), ("uncond", 1, "y")]


# ------------------------------------------------------------------ 8. no guidance
def test_guidance_one_gives_only_cond_samples(sd_pipe, run):
    with probe(sd_pipe, passes="all") as store:
        run(sd_pipe, "a dog", guidance_scale=1.0, num_images_per_prompt=2)
    assert [(s.pass_label, s.image_index, s.row) for s in store.samples] == [("cond", 0, 0), ("cond", 1, 1)]
    assert all(c.layout == ("cond", "cond") for c in store.calls)
    assert store.meta["guidance"] is False


def test_uncond_without_guidance_raises(sd_pipe, run, assert_clean):
    with pytest.raises(ProbeError, match="uncond"):
        with probe(sd_pipe, passes="uncond"):
            run(sd_pipe, "a dog", guidance_scale=1.0)
    assert_clean(sd_pipe)


# ------------------------------------------------------------------ 9. denoiser calls and timesteps
def _count_calls(pipe):
    seen = []

    def hook(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(float(torch.as_tensor(t).reshape(-1)[0]))

    return seen, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("scheduler, steps", [("ddim", 3), ("heun", 3), ("pndm", 10)])
def test_calls_match_denoiser_calls(scheduler, steps, run):
    pipe = tiny_sd_pipeline(seed=0, scheduler=scheduler)
    timesteps, handle = _count_calls(pipe)
    try:
        with probe(pipe, sites=[FIRST, MID]) as store:
            run(pipe, num_inference_steps=steps)
    finally:
        handle.remove()
    if scheduler == "heun":
        assert len(timesteps) == 2 * steps - 1  # 2 calls per step, the first step's second call skipped
    elif scheduler == "pndm":
        assert len(timesteps) == steps + 1  # PLMS warm-up as SD 1.5 ships it (skip_prk_steps): 11 calls for 10
    else:
        assert len(timesteps) == steps
    assert len(store.calls) == len(timesteps) == store[FIRST].shape[0] == store[MID].shape[0]
    assert [c.timestep for c in store.calls] == timesteps
    assert [c.index for c in store.calls] == list(range(len(timesteps)))
    assert store.meta["scheduler"] == type(pipe.scheduler).__name__


# ------------------------------------------------------------------ 10. non-square grids
def test_non_square_image_grids(sd_pipe, run):
    with probe(sd_pipe, heads="mean") as store:
        run(sd_pipe, height=64, width=96)
    grids = {n: tuple(store[n].shape[3:5]) for n in store}
    assert grids[FIRST] == (8, 12)
    assert grids["down_blocks.1.attentions.0.transformer_blocks.0.attn2"] == (4, 6)
    assert grids["down_blocks.2.attentions.0.transformer_blocks.0.attn2"] == (2, 3)
    assert grids[MID] == (1, 2)  # 12 → 6 → 3 → 2: ceil halving
    assert grids["up_blocks.3.attentions.2.transformer_blocks.0.attn2"] == (8, 12)
    assert store.meta["latent_size"] == [8, 12] and store.meta["image_size"] == [64, 96]
    assert not store.flat_sites
    assert tuple(attnprobe.heatmap(store, "dog", 0).shape) == (64, 96)


# ------------------------------------------------------------------ 15. prompt_embeds
@pytest.fixture(scope="module")
def dog_embeds(sd_pipe):
    with torch.no_grad():
        return sd_pipe.encode_prompt("a picture of dog", "cpu", 1, True)


def test_prompt_embeds_give_unlabelled_tokens(sd_pipe, run, dog_embeds):
    cond_embeds, uncond_embeds = dog_embeds
    with probe(sd_pipe) as store:
        run(sd_pipe, None, prompt_embeds=cond_embeds, negative_prompt_embeds=uncond_embeds)
    assert store.samples[0].text is None
    assert store.tokens(0) == [""] * 77
    with pytest.raises(ConceptError, match="prompts="):
        store.token_indices(0, "dog")


def test_prompt_embeds_with_caller_prompts(sd_pipe, run, dog_embeds):
    cond_embeds, uncond_embeds = dog_embeds
    with probe(sd_pipe, prompts=["a picture of dog"]) as store:
        run(sd_pipe, None, prompt_embeds=cond_embeds, negative_prompt_embeds=uncond_embeds)
    assert store.token_indices(0, "dog") == [[4]]
    assert store.layout(0).source == "caller"


def test_a_direct_denoiser_call_after_a_guided_pipeline_call_has_no_guidance(sd_pipe, run, dog_embeds):
    run(sd_pipe, "a picture of cat")  # leaves guidance_scale 7.5 on the pipeline
    texts = ["a picture of dog", "a picture of cat"]
    ids = sd_pipe.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with probe(sd_pipe, prompts=texts, dtype=torch.float32) as store:
        sd_pipe.unet(latents, torch.tensor([500, 500]), sd_pipe.text_encoder(ids)[0])
    assert [s.text for s in store.samples] == texts and [s.pass_label for s in store.samples] == ["cond", "cond"]
    assert store.token_indices(1, "cat") == [[4]]


def test_prompt_embeds_without_negative_embeds(sd_pipe, run, dog_embeds):
    with probe(sd_pipe, prompts=["a picture of dog"]) as store:
        run(sd_pipe, None, prompt_embeds=dog_embeds[0])
    assert store.samples[0].text == "a picture of dog"
    assert store.token_indices(0, "dog") == [[4]]


def test_negative_prompt_embeds_are_not_labelled_zeros(sd_pipe, run, dog_embeds):
    with probe(sd_pipe, passes="uncond") as store:
        run(sd_pipe, None, prompt_embeds=dog_embeds[0], negative_prompt_embeds=dog_embeds[1])
    assert store.layout(0).source != "zeros"


# ------------------------------------------------------------------ 16. SDXL zero uncond embeddings
def test_sdxl_zero_uncond_maps_are_uniform(sdxl_pipe, run):
    with probe(sdxl_pipe, passes="all", dtype=torch.float32) as store:
        run(sdxl_pipe, "a picture of dog")
    uncond, cond = store.samples
    assert uncond.pass_label == "uncond" and store.layout(uncond).source == "zeros"
    assert store.layout(cond).source == "prompt" and store.token_indices(cond, "dog") == [[4]]
    for name in store:
        assert (store[name][:, uncond.index] == torch.tensor(1 / 77)).all(), name
        assert not (store[name][:, cond.index] == torch.tensor(1 / 77)).all(), name


def test_sdxl_negative_prompt_labels_uncond(sdxl_pipe, run):
    with probe(sdxl_pipe, passes="all", dtype=torch.float32) as store:
        run(sdxl_pipe, "a picture of cat", negative_prompt="dog")
    uncond, cond = store.samples
    assert store.layout(uncond).source == "prompt" and store.token_indices(uncond, "dog") == [[1]]
    with pytest.raises(ConceptError):
        store.token_indices(cond, "dog")
    assert not (store[MID][:, uncond.index] == torch.tensor(1 / 77)).all()


# ------------------------------------------------------------------ 17. several pipeline calls in one probe
def test_two_generations_in_one_probe(sd_pipe, run):
    with probe(sd_pipe, sites=FIRST) as store:
        run(sd_pipe, "a dog")
        run(sd_pipe, "a dog", seed=1)
    assert [(c.index, c.generation) for c in store.calls] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert store[FIRST].shape[0] == 4
    assert not torch.equal(store[FIRST][0], store[FIRST][2])  # other seed, other maps


def test_second_generation_with_other_batch_raises(sd_pipe, run, assert_clean):
    with pytest.raises(SampleLayoutError, match="One store holds one sample layout and size: open a new probe"):
        with probe(sd_pipe, sites=FIRST) as store:
            run(sd_pipe, "a dog")
            run(sd_pipe, ["a dog", "a cat"])
    assert issubclass(SampleLayoutError, ProbeError)
    assert [c.generation for c in store.calls] == [0, 0]
    assert store[FIRST].shape[:2] == (2, 1)
    assert_clean(sd_pipe)


def test_second_generation_error_caught_inside_keeps_generation_zero(sd_pipe, run):
    with probe(sd_pipe, sites=FIRST) as store:
        run(sd_pipe, "a dog")
        with pytest.raises(SampleLayoutError):
            run(sd_pipe, "a cat")  # same count, other text: another sample layout
    assert [c.generation for c in store.calls] == [0, 0]
    assert store[FIRST].shape[0] == 2 and store.samples[0].text == "a dog"


def test_generations_with_prompt_embeds(sd_pipe, run, dog_embeds):
    with probe(sd_pipe, sites=FIRST) as store:
        run(sd_pipe, None, prompt_embeds=dog_embeds[0], negative_prompt_embeds=dog_embeds[1])
        run(sd_pipe, None, prompt_embeds=dog_embeds[0], negative_prompt_embeds=dog_embeds[1])
    assert [c.generation for c in store.calls] == [0, 0, 1, 1]


def test_prompt_embeds_second_call_with_other_batch_raises(sd_pipe, run, dog_embeds):
    with torch.no_grad():
        two = sd_pipe.encode_prompt(["a dog", "a cat"], "cpu", 1, True)
    with pytest.raises(ProbeError):
        with probe(sd_pipe, sites=FIRST):
            run(sd_pipe, None, prompt_embeds=dog_embeds[0], negative_prompt_embeds=dog_embeds[1])
            run(sd_pipe, None, prompt_embeds=two[0], negative_prompt_embeds=two[1])


# ------------------------------------------------------------------ metadata
def test_store_meta(sd_pipe, run):
    with probe(sd_pipe, passes="all", heads="mean", dtype=torch.bfloat16) as store:
        run(sd_pipe, "a dog", num_inference_steps=3)
    meta = store.meta
    assert meta["pipeline"] == "StableDiffusionPipeline" and meta["denoiser"] == "UNet2DConditionModel"
    capture = dict(meta["capture"], sites=sorted(meta["capture"]["sites"]))
    assert capture == {"passes": "all", "heads": "mean", "dtype": "bfloat16", "sites": sorted(store.site_names),
                       "calls": None, "tokens": None, "aggregate": None, "stream_to": None}
    assert meta["timesteps"] == [c.timestep for c in store.calls]
    assert meta["prompts"] == ["a dog"] and meta["negative_prompts"] == [""] and meta["guidance"] is True
    assert meta["denoiser_config"]["cross_attention_dim"] == 32
    assert store[MID].dtype == torch.bfloat16


def test_calls_are_complete_inside_the_block(sd_pipe, run):
    """A denoiser call is handed to the store when the denoiser returns: inside the block, after a 4-step pipeline
    call, store.calls holds all 4 (not 3 until the next call or the exit), and the image is the one without a probe."""
    plain = run(sd_pipe, num_inference_steps=4).images
    with probe(sd_pipe, dtype=torch.float32) as store:
        out = run(sd_pipe, num_inference_steps=4).images
        assert [c.index for c in store.calls] == [0, 1, 2, 3]
        assert store[store.site_names[0]].shape[0] == 4
        run(sd_pipe, num_inference_steps=2)
        assert [c.generation for c in store.calls] == [0, 0, 0, 0, 1, 1]
    assert len(store.calls) == 6 and store.meta["complete"]
    assert torch.equal(out, plain)
    with probe(sd_pipe, aggregate="mean") as agg:
        run(sd_pipe, num_inference_steps=4)
    assert len(agg.calls) == 4


def test_a_call_that_raised_inside_the_denoiser_is_dropped_and_the_probe_goes_on():
    """An exception inside a denoiser call, caught by the caller: the next pipeline call in the same probe records
    (the unfinished call's partial maps are dropped with a warning, not blamed on bypassed processors)."""
    pipe = tiny_sd_pipeline()
    fired = []

    def boom(module, args):
        if not fired:
            fired.append(1)
            raise RuntimeError("boom")

    hook = pipe.unet.mid_block.register_forward_pre_hook(boom)
    try:
        with attnprobe.probe(pipe, heads="mean") as store:
            with pytest.raises(RuntimeError, match="boom"):
                pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
            with pytest.warns(UserWarning, match="did not finish"):
                pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
    finally:
        hook.remove()
    assert len(store.calls) == 2 and {c.generation for c in store.calls} == {1}


def test_a_calls_predicate_that_fails_says_so():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ProbeError, match=r"must take \(index, timestep\)"):
        with attnprobe.probe(pipe, calls=lambda i: i < 2):
            pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
    # what is not a bool would keep every call it is truthy for: refused, naming what came back
    with pytest.raises(ProbeError, match=r"must return a bool; called with \(0, .*\) it returned str 'no'"):
        with attnprobe.probe(pipe, calls=lambda i, t: "no"):
            pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
    # torch's and numpy's bools (a 0-d array too); numpy's ints as indices
    for answer in (lambda i, t: torch.tensor(i) < 1, lambda i, t: np.int64(i) < 1, lambda i, t: np.array(i < 1),
                   np.arange(0, 1), [np.int64(0)], np.int32(0)):
        with attnprobe.probe(pipe, calls=answer) as store:
            pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
        assert [c.index for c in store.calls] == [0]
    with pytest.raises(ProbeError, match="meta"):
        attnprobe.probe(pipe, device="meta").__enter__()
    with pytest.raises(ProbeError, match="float8"):
        attnprobe.probe(pipe, dtype=torch.float8_e4m3fn).__enter__()
