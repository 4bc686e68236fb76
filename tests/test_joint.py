"""Transformer denoisers: SD3 and Flux joint attention (exact and renorm maps), Flux single-stream blocks and true
CFG, PixArt-α cross-attention with the T5 padding mask. Tiny pipelines (``attnprobe.testing``), CPU.

The float64 reference never touches attnprobe: our own pre-forward hook on each attention module keeps its inputs;
q and k are recomputed from the module's projections and norms (and our own rotary embedding for Flux), and the
full softmax over [image; text] keys is taken in float64.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnprobe
from attnprobe.capture import joint
from attnprobe.errors import ProbeError, StoreError
from attnprobe.capture.cross import ProbeProcessor
from attnprobe.testing import tiny_flux_pipeline, tiny_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

PROMPT = "a picture of dog"
T5_LEN = 16
OPTIONS = {
    "sd3": dict(height=64, width=64, max_sequence_length=T5_LEN),
    "flux": dict(height=64, width=96, max_sequence_length=T5_LEN),
    "pixart": dict(height=64, width=64, max_sequence_length=T5_LEN, use_resolution_binning=False, clean_caption=False),
}
OPTIONS["pixart-sigma"] = OPTIONS["pixart"]
OPTIONS["chroma"] = OPTIONS["flux"]
BUILD = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "pixart": tiny_pixart_pipeline,
         "pixart-sigma": partial(tiny_pipeline, "pixart-sigma"), "chroma": partial(tiny_pipeline, "chroma")}


@pytest.fixture(scope="module")
def pipes():
    return {name: build() for name, build in BUILD.items()}


def generate(pipe, family, prompt=PROMPT, steps=2, **kwargs):
    options = dict(OPTIONS[family], num_inference_steps=steps, output_type="latent",
                   generator=torch.Generator().manual_seed(0))
    options.update(kwargs)
    return pipe(prompt, **options).images


def processors(pipe):
    return {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}


# ---------------------------------------------------------------------------------------------- sites
def test_sites_by_structure(pipes):
    kinds = lambda pipe: [(s.name, s.kind) for s in attnprobe.list_sites(pipe)]  # noqa: E731
    assert kinds(pipes["sd3"]) == [("transformer_blocks.0.attn", "joint"), ("transformer_blocks.1.attn", "joint")]
    assert kinds(pipes["flux"]) == [("transformer_blocks.0.attn", "joint"), ("single_transformer_blocks.0.attn", "single"),
                                    ("single_transformer_blocks.1.attn", "single")]
    assert kinds(pipes["pixart"]) == [("transformer_blocks.0.attn2", "cross"), ("transformer_blocks.1.attn2", "cross")]
    sd35 = tiny_sd3_pipeline(dual_attention=True)  # SD3.5: attn2 is image self-attention, not a site
    assert sd35.transformer.get_submodule("transformer_blocks.0.attn2") is not None
    assert kinds(sd35) == kinds(pipes["sd3"])


def test_a_class_conditional_dit_has_no_sites():
    from diffusers import Transformer2DModel

    from attnprobe.errors import NoSitesError

    dit = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8,
                             patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10, norm_num_groups=4)
    with pytest.raises(NoSitesError, match="no cross-attention site"):
        attnprobe.list_sites(dit)


def test_fused_projections_before_the_probe(pipes):
    pipe = tiny_flux_pipeline()
    with attnprobe.probe(pipe, dtype=torch.float32) as plain:
        generate(pipe, "flux")
    pipe.transformer.fuse_qkv_projections()
    assert pipe.transformer.get_submodule("single_transformer_blocks.0.attn").fused_projections
    before = generate(pipe, "flux")
    with attnprobe.probe(pipe, dtype=torch.float32) as fused:
        assert torch.equal(generate(pipe, "flux"), before)
    for site in plain.site_names:
        assert torch.allclose(plain[site], fused[site], atol=1e-5)


def test_real_topologies_on_meta():
    from collections import Counter

    from attnprobe.testing import FLUX_DEV_TRANSFORMER, SD3_MEDIUM_TRANSFORMER, SD35_MEDIUM_TRANSFORMER, transformer_on_meta

    found = {name: attnprobe.list_sites(transformer_on_meta(config)) for name, config in
             [("sd3", SD3_MEDIUM_TRANSFORMER), ("sd35", SD35_MEDIUM_TRANSFORMER), ("flux", FLUX_DEV_TRANSFORMER)]}
    assert Counter(s.kind for s in found["sd3"]) == {"joint": 24}
    assert [s.name for s in found["sd35"]] == [s.name for s in found["sd3"]]  # 13 attn2 layers are not sites
    assert Counter(s.kind for s in found["flux"]) == {"joint": 19, "single": 38}
    assert {(s.heads, s.head_dim) for s in found["flux"]} == {(24, 128)}
    assert {(s.heads, s.head_dim) for s in found["sd3"]} == {(24, 64)}


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["sd3", "flux", "chroma", "pixart", "pixart-sigma"])
def test_images_bit_identical_and_processors_restored(pipes, family, dtype):
    pipe = pipes[family] if dtype == torch.float32 else BUILD[family](dtype=dtype)
    before = processors(pipe)
    plain = generate(pipe, family)
    with attnprobe.probe(pipe, passes="all" if family not in ("flux", "chroma") else "cond") as store:
        probed = generate(pipe, family)
    assert torch.equal(plain, probed)
    assert processors(pipe) == before and not any(isinstance(p, ProbeProcessor) for p in before.values())
    assert not pipe.transformer._forward_pre_hooks
    for site in store.sites:
        maps = store[site.name].float()
        assert torch.isfinite(maps).all() and maps.shape[:2] == (2, len(store.samples))


def test_processors_restored_when_the_pipeline_raises(pipes):
    pipe = pipes["flux"]
    before = processors(pipe)
    def stop(*args):
        raise RuntimeError("stop after the first step")

    with pytest.raises(RuntimeError, match="stop after"):
        with attnprobe.probe(pipe) as store:
            generate(pipe, "flux", callback_on_step_end=stop)
    assert processors(pipe) == before and not pipe.transformer._forward_pre_hooks
    assert len(store.calls) == 1 and store.meta["complete"] is False


# ---------------------------------------------------------------------------------------------- exact maps
class Inputs:
    """Each attention module's inputs per call, kept by our own pre-forward hooks (``with_kwargs``)."""

    def __init__(self, denoiser, names):
        self.modules = {n: denoiser.get_submodule(n) for n in names}
        self.seen = {n: [] for n in names}
        self.text_len = []
        self.handles = [m.register_forward_pre_hook(partial(self._keep, n), with_kwargs=True)
                        for n, m in self.modules.items()]
        self.handles.append(denoiser.register_forward_pre_hook(
            lambda m, a, k: self.text_len.append(k["encoder_hidden_states"].shape[1]), with_kwargs=True))

    def _keep(self, name, module, args, kwargs):
        get = lambda i, key: args[i] if len(args) > i else kwargs.get(key)  # noqa: E731
        clone = lambda t: t if t is None or not isinstance(t, torch.Tensor) else t.detach().clone()  # noqa: E731
        emb = get(3, "image_rotary_emb")
        self.seen[name].append((clone(get(0, "hidden_states")), clone(get(1, "encoder_hidden_states")),
                                None if emb is None else tuple(e.double() for e in emb), clone(get(2, "attention_mask"))))

    def close(self):
        for h in self.handles:
            h.remove()


def _rope64(x, emb):
    """Rotary embedding on interleaved pairs, written out in float64 (x: [batch, seq, head, d])."""
    if emb is None:
        return x
    cos, sin = (e[:, None, :] for e in emb)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def reference(attn, kind, hidden, states, emb, text_len, mask=None):
    """Image-query × text-key block of the full softmax over all keys, float64 ``[batch, head, N, T]``; a float mask
    is added to the logits, a boolean one removes the keys it marks False (as scaled-dot-product attention does)."""
    probs, image, text = full_softmax(attn, kind, hidden, states, emb, text_len, mask)
    return probs[:, :, image, text]


@torch.no_grad()
def full_softmax(attn, kind, hidden, states, emb, text_len, mask=None):
    """The whole softmax over every key in float64, ``[batch, head, query, key]``, and the image and text slices of
    its sequence."""
    attn64 = {n: getattr(attn, n, None) for n in ("to_q", "to_k", "add_q_proj", "add_k_proj", "norm_q", "norm_k",
                                            "norm_added_q", "norm_added_k")}
    dbl = lambda module, x: module.double()(x.double()) if module is not None else x.double()  # noqa: E731
    heads = attn.heads
    split = lambda x: x.reshape(*x.shape[:2], heads, -1)  # noqa: E731
    try:
        q, k = split(dbl(attn64["to_q"], hidden)), split(dbl(attn64["to_k"], hidden))
        q, k = dbl(attn64["norm_q"], q), dbl(attn64["norm_k"], k)
        if kind == "joint":
            tq, tk = split(dbl(attn64["add_q_proj"], states)), split(dbl(attn64["add_k_proj"], states))
            tq, tk = dbl(attn64["norm_added_q"], tq), dbl(attn64["norm_added_k"], tk)
            text_first = emb is not None  # Flux: [text; image]; SD3: [image; text]
            q = torch.cat([tq, q] if text_first else [q, tq], dim=1)
            k = torch.cat([tk, k] if text_first else [k, tk], dim=1)
            t = states.shape[1]
            image = slice(t, None) if text_first else slice(0, q.shape[1] - t)
            text = slice(0, t) if text_first else slice(q.shape[1] - t, None)
        else:  # single stream: [text; image] in one sequence
            image, text = slice(text_len, None), slice(0, text_len)
        q, k = _rope64(q, emb), _rope64(k, emb)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        if mask is not None:  # Chroma: [batch, 1, seq, seq] over [text; image]
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
        return logits.softmax(-1), image, text
    finally:
        for module in attn64.values():
            if module is not None:
                module.float()


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma"])
def test_exact_equals_float64_full_softmax_and_renorm(pipes, family):
    pipe = pipes[family]
    sites = attnprobe.list_sites(pipe)
    seen = Inputs(pipe.transformer, [s.name for s in sites])
    try:
        with attnprobe.probe(pipe, passes="all" if family == "sd3" else "cond", dtype=torch.float32) as exact:
            # Chroma: guidance as separate calls, cond first; its T5 padding masked (a float mask, added)
            generate(pipe, family)
    finally:
        seen.close()
    with attnprobe.probe(pipe, passes="all" if family == "sd3" else "cond", dtype=torch.float32, joint="renorm") as renorm:
        generate(pipe, family)
    for site in sites:
        attn = pipe.transformer.get_submodule(site.name)
        for call in range(len(exact.calls)):
            index = exact.calls[call].index  # Chroma's store keeps the cond calls 0, 2
            hidden, states, emb, mask = seen.seen[site.name][index]
            want = reference(attn, site.kind, hidden, states, emb, seen.text_len[index], mask)
            got = exact[site.name][call].flatten(2, 3).double()  # [sample, head, N, T]
            rows = [s.row for s in exact.samples]
            assert (got - want[rows]).abs().max() <= 1e-6, site.name
            share = got.sum(-1)
            assert ((share >= 0) & (share <= 1 + 1e-6)).all()
            recorded = torch.tensor(exact.meta["text_share"][site.name][call], dtype=torch.float64)
            assert torch.allclose(recorded, share.mean(-1), atol=1e-5)  # [sample, head]
            renormed = renorm[site.name][call].flatten(2, 3).double()
            assert torch.allclose(got / share.unsqueeze(-1), renormed, atol=1e-6)
            assert torch.allclose(renormed.sum(-1), torch.ones(()).double(), atol=1e-6)
    assert exact.meta["capture"]["joint"] == "exact" and renorm.meta["capture"]["joint"] == "renorm"
    assert exact.text_share(sites[0]).shape == (len(exact.calls), len(exact.samples), sites[0].heads)
    with pytest.raises(StoreError, match="joint='renorm'"):
        renorm.text_share(sites[0])


def test_a_boolean_mask_removes_keys_and_a_float_mask_is_added():
    torch.manual_seed(0)
    q, ki, kt = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 4, 8)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 2:4] = False  # sample 0: text keys 2 and 3 are padding
    logits = torch.cat([q @ kt.transpose(-1, -2), q @ ki.transpose(-1, -2)], dim=-1)  # [text; image] keys
    for mask in (keep, keep.float() * 0.5):
        bias = joint.mask_bias(mask, None, 4)
        added = torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask
        want = (logits + added[:, None, None, :]).softmax(-1)[..., :4]
        for chunk in (6, 4):
            got, _ = joint.joint_probs(q, ki, kt, chunk=chunk, bias=bias)
            assert torch.allclose(got, want, atol=1e-6)
    got, _ = joint.joint_probs(q, ki, kt, bias=joint.mask_bias(keep, None, 4))
    assert (got[0, ..., 2:4] == 0).all() and (got[1] > 0).all()
    renorm, _ = joint.joint_probs(q, ki, kt, mode="renorm", bias=joint.mask_bias(keep, None, 4))
    assert (renorm[0, ..., 2:4] == 0).all() and torch.allclose(renorm.sum(-1), torch.ones(()))


def test_chunked_equals_unchunked(pipes, monkeypatch):
    torch.manual_seed(0)
    q, ki, kt = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 5, 8)
    whole, share = joint.joint_probs(q, ki, kt, chunk=10)
    for chunk in (1, 3, 7):
        part, part_share = joint.joint_probs(q, ki, kt, chunk=chunk)
        assert torch.allclose(part, whole, atol=1e-7) and torch.allclose(part_share, share, atol=1e-7)
    full = (torch.cat([q @ ki.transpose(-1, -2), q @ kt.transpose(-1, -2)], -1)).double().softmax(-1)[..., 10:]
    assert torch.allclose(whole.double(), full, atol=1e-6)
    pipe = pipes["sd3"]
    with attnprobe.probe(pipe, dtype=torch.float32) as default:
        generate(pipe, "sd3")
    monkeypatch.setattr(joint, "CHUNK_ELEMENTS", 1)  # one image query per chunk
    with attnprobe.probe(pipe, dtype=torch.float32) as chunked:
        generate(pipe, "sd3")
    for site in default.site_names:
        assert torch.allclose(default[site], chunked[site], atol=1e-7)


# ---------------------------------------------------------------------------------------------- tokens, grids
def test_sd3_tokens_are_clip_then_t5_and_concepts_are_found_in_both(pipes):
    pipe = pipes["sd3"]
    with attnprobe.probe(pipe, heads="mean", passes="all") as store:
        generate(pipe, "sd3", prompt="a picture of dog", negative_prompt="blurry")
    assert store[store.site_names[0]].shape == (2, 2, 1, 4, 4, 77 + T5_LEN)
    cond = [s for s in store.samples if s.pass_label == "cond"][0]
    tokens = store.tokens(cond.index)
    assert tokens[:6] == ["<|startoftext|>", "a", "picture", "of", "dog", "<|endoftext|>"]
    assert tokens[77:82] == ["a", "picture", "of", "dog", "</s>"] and tokens[82] == "<pad>"
    assert store.token_indices(cond.index, "dog") == [[4, 77 + 3]]
    assert store.layout(cond.index).streams == ["text_encoder"] * 77 + ["text_encoder_3"] * T5_LEN
    uncond = [s for s in store.samples if s.pass_label == "uncond"][0]
    assert store.token_indices(uncond.index, "blurry") == [[1, 77]]


def test_sd3_capture_options_equal_the_reduced_full_store(pipes, tmp_path):
    pipe = pipes["sd3"]
    with attnprobe.probe(pipe, passes="all", dtype=torch.float32) as full:
        generate(pipe, "sd3")
    with attnprobe.probe(pipe, passes="cond", heads="mean", dtype=torch.float32, sites="transformer_blocks.1.*",
                         tokens="dog", stream_to=tmp_path / "s") as small:
        generate(pipe, "sd3")
    site = "transformer_blocks.1.attn"
    assert small.site_names == [site]
    loaded = attnprobe.AttentionStore.load(tmp_path / "s")
    rows = [s.index for s in full.samples if s.pass_label == "cond"]
    want = full[site][:, rows].mean(2, keepdim=True)[..., [4, 77 + 3]]
    assert torch.allclose(loaded[site], want, atol=1e-6)
    assert loaded.meta["text_share"][site][0][0][0] == pytest.approx(
        sum(full.meta["text_share"][site][0][rows[0]]) / 4, abs=1e-5)


def test_flux_tokens_grid_and_timesteps(pipes):
    pipe = pipes["flux"]
    with attnprobe.probe(pipe) as store:
        generate(pipe, "flux", height=64, width=96)  # non-square: 8×12 latents packed 2×2 → a 4×6 grid
    for site in store.sites:
        assert store[site.name].shape == (2, 1, 2, 4, 6, T5_LEN)
    assert store.tokens(0)[:5] == ["a", "picture", "of", "dog", "</s>"]
    assert store.token_indices(0, "dog") == [[3]]
    assert store.token_kinds(0)[4:6] == ["end", "pad"]
    assert [c.timestep for c in store.calls] == pytest.approx(store.meta["timesteps"])
    assert store.meta["image_size"] == [64, 96]
    sd3 = pipes["sd3"]
    with attnprobe.probe(sd3, heads="mean") as wide:
        generate(sd3, "sd3", height=64, width=96)
    assert wide[wide.site_names[0]].shape[3:5] == (4, 6)


def test_flux_true_cfg_uncond_calls_are_labelled_apart(pipes):
    pipe = pipes["flux"]
    cfg = dict(negative_prompt="blurry", true_cfg_scale=2.0)
    plain = generate(pipe, "flux", **cfg)
    with attnprobe.probe(pipe, passes="cond") as cond, attnprobe.probe(pipe, passes="uncond") as uncond:
        probed = generate(pipe, "flux", **cfg)
    assert torch.equal(plain, probed)
    assert [c.index for c in cond.calls] == [0, 2] and [c.index for c in uncond.calls] == [1, 3]
    assert all(c.layout == ("cond",) for c in cond.calls) and all(c.layout == ("uncond",) for c in uncond.calls)
    assert {c.generation for c in cond.calls + uncond.calls} == {0}  # an uncond call does not start a generation
    assert cond.samples[0].text == PROMPT and uncond.samples[0].pass_label == "uncond"
    assert uncond.samples[0].text == "blurry" and uncond.token_indices(0, "blurry") == [[0]]
    site = cond.site_names[0]
    assert not torch.equal(cond[site], uncond[site])
    with pytest.raises(ProbeError, match="separate denoiser calls"):
        with attnprobe.probe(pipe, passes="all"):
            generate(pipe, "flux", **cfg)
    with attnprobe.probe(pipe) as no_cfg:  # embedded guidance only: every call is conditional
        generate(pipe, "flux")
    assert [c.index for c in no_cfg.calls] == [0, 1]


def test_flux_conditioning_switched_inside_the_call_is_nan(pipes):
    pipe = pipes["flux"]
    other, _, _ = pipe.encode_prompt("a red house", "a red house", max_sequence_length=T5_LEN)

    def switch(p, i, t, kwargs):
        return {"prompt_embeds": other} if i == 0 else {}

    switched = dict(callback_on_step_end=switch, callback_on_step_end_tensor_inputs=["prompt_embeds"], steps=3)
    for cfg in ({}, dict(negative_prompt="blurry", true_cfg_scale=2.0)):  # batched, and true CFG's separate calls
        with pytest.warns(attnprobe.AttnprobeWarning, match=r"conditioning of samples \[0\] changed"):
            with attnprobe.probe(pipe, dtype=torch.float32) as store:
                generate(pipe, "flux", **switched, **cfg)
        nan = store[store.site_names[0]].isnan()
        assert len(store.calls) == 3 and not nan[0].any() and nan[1:].all()


@pytest.mark.parametrize("family", ["pixart", "pixart-sigma"])
def test_pixart_padded_t5_tokens_get_exactly_zero(pipes, family):
    pipe = pipes[family]
    with attnprobe.probe(pipe, passes="all", dtype=torch.float32) as store:
        generate(pipe, family, prompt="a picture of Dog")
    assert store.meta["family"] == "pixart" and store.meta["pipeline"] == type(pipe).__name__
    for sample in store.samples:
        kinds = store.token_kinds(sample.index)
        pad = [i for i, k in enumerate(kinds) if k == "pad"]
        assert pad and store.meta["text_mask"][sample.index] == [int(k != "pad") for k in kinds]
        for site in store.site_names:
            maps = store[site][:, sample.index]
            assert (maps[..., pad] == 0).all()
            assert torch.allclose(maps.sum(-1), torch.ones(()), atol=1e-5)
    cond = [s for s in store.samples if s.pass_label == "cond"][0]
    assert store.token_indices(cond.index, "dog") == [[3]]


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_sites_and_study_on_tiny_transformers(tmp_path, capsys):
    from attnprobe.study import cli

    assert cli.main(["sites", "--model", "tiny-flux"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("# site\t")  # a header, then one line per site
    assert [line.split("\t")[2] for line in listed[1:]] == ["joint", "single", "single"]
    assert cli.main(["sites", "--model", "tiny-pixart"]) == 0
    assert [line.split("\t")[2] for line in capsys.readouterr().out.splitlines()[1:]] == ["cross", "cross"]
    out = tmp_path / "sd3"
    assert cli.main(["study", "--model", "tiny-sd3", "--out", str(out), "--concepts", "dog", "--seeds", "0",
                     "--steps", "2", "--variants", "baseline,instruction", "--scorer", "none", "--no-progress"]) == 0
    rows = (out / "auc.csv").read_text().splitlines()
    assert len(rows) == 3 and (out / "heatmaps.png").exists()
    assert (out / "failures.csv").read_text().splitlines() == ["model,concept,seed,error,detail"]


def test_attention_edits_refuse_transformer_pipelines_before_generating(pipes):
    # (a negative prompt, which edits nothing of the denoiser, works there: tests/test_interventions.py)
    from attnprobe import AttentionEdit, intervene
    from attnprobe.errors import InterventionError

    with pytest.raises(InterventionError, match="StableDiffusion3Pipeline.*joint attention"):
        with intervene(pipes["sd3"], AttentionEdit(0.0), PROMPT, concept="dog"):
            pass


def test_wrapper_forwards_the_attention_backend_to_the_installed_processor(pipes):
    pipe = pipes["flux"]
    attn = pipe.transformer.get_submodule("transformer_blocks.0.attn")
    with attnprobe.probe(pipe):
        wrapper = attn.processor
        assert isinstance(wrapper, ProbeProcessor)
        wrapper._attention_backend = "native"  # what diffusers' set_attention_backend does to each processor
        assert wrapper.inner._attention_backend == "native" and wrapper._parallel_config is None
        generate(pipe, "flux")
    assert attn.processor._attention_backend == "native"
    attn.processor._attention_backend = None


def test_compiled_flux_transformer_same_maps_and_no_recompile_after_warm_up(pipes):
    """Joint and single-stream wrappers under ``torch.compile`` (dynamo's eager backend)."""
    pipe = tiny_flux_pipeline()
    with attnprobe.probe(pipe, dtype=torch.float32) as eager:
        plain = generate(pipe, "flux")
    torch._dynamo.reset()
    pipe.transformer.compile(backend="eager")
    try:
        with attnprobe.probe(pipe, dtype=torch.float32):  # warm-up: compiles
            generate(pipe, "flux")
        with torch.compiler.set_stance("fail_on_recompile"):
            with attnprobe.probe(pipe, dtype=torch.float32) as compiled:
                assert torch.equal(generate(pipe, "flux"), plain)
    finally:
        torch._dynamo.reset()
    for site in eager.site_names:
        torch.testing.assert_close(compiled[site], eager[site], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ fixes from a breaking session


def test_sd3_prompt_3_is_labelled_but_not_searched_with_prompts_offsets(pipes):
    pipe = pipes["sd3"]
    with pytest.warns(UserWarning, match="prompt_3 differs from prompt"):
        with attnprobe.probe(pipe) as store:
            generate(pipe, "sd3", prompt="a dog", prompt_3="the big dog")
    assert store.tokens(0)[77:80] == ["the", "big", "dog"]
    assert store.token_indices(0, "dog") == [[2]]  # the CLIP mention only: T5 read another text


def test_flux_true_cfg_with_one_tensor_for_both_passes(pipes):
    pipe = pipes["flux"]
    embeds, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=T5_LEN)
    options = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=embeds,
                   negative_pooled_prompt_embeds=pooled, true_cfg_scale=2.0)
    with attnprobe.probe(pipe, passes="cond") as cond, attnprobe.probe(pipe, passes="uncond") as uncond:
        generate(pipe, "flux", prompt=None, **options)
    assert [c.index for c in cond.calls] == [0, 2] and [c.index for c in uncond.calls] == [1, 3]


def test_flux_bf16_timesteps_are_the_schedulers():
    pipe = tiny_flux_pipeline(dtype=torch.bfloat16)
    with attnprobe.probe(pipe, heads="mean", tokens=[0]) as store:
        generate(pipe, "flux", steps=60, height=32, width=32)
    assert [c.timestep for c in store.calls] == pipe.scheduler.timesteps.float().tolist()


def test_exact_and_renorm_stores_are_not_compared(pipes):
    pipe = pipes["sd3"]
    with attnprobe.probe(pipe, joint="exact") as a:
        generate(pipe, "sd3")
    with attnprobe.probe(pipe, joint="renorm") as b:
        generate(pipe, "sd3")
    with pytest.raises(attnprobe.StoreError, match="joint maps: 'exact' vs 'renorm'"):
        attnprobe.compare(a, b, "dog")


def test_skip_layer_guidance_and_fusing_inside_the_probe_say_so(pipes):
    with pytest.raises(ProbeError, match="skip_guidance_layers"):
        with attnprobe.probe(pipes["sd3"]):
            generate(pipes["sd3"], "sd3", steps=4, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
                     skip_layer_guidance_stop=1.0)
    flux = tiny_flux_pipeline()
    before = processors(flux)
    with pytest.raises(ProbeError, match="were changed during the probe"):
        with attnprobe.probe(flux):
            flux.transformer.fuse_qkv_projections()
            generate(flux, "flux")
    assert processors(flux) == before


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_processor_that_edits_joint_attention_is_named(pipes, family):
    pipe = pipes[family]
    sites = ["transformer_blocks.0.attn"] + (["single_transformer_blocks.0.attn"] if family == "flux" else [])
    attns = [pipe.transformer.get_submodule(site) for site in sites]
    originals = [attn.processor for attn in attns]

    class DoubleKeys(type(originals[0])):
        """Doubles the text keys (all keys of a single-stream block) the softmax sees, as attention control does."""

        def __call__(self, attn, *args, **kwargs):
            projection = getattr(attn, "add_k_proj", None) or attn.to_k
            hook = projection.register_forward_hook(lambda m, a, o: o * 2)
            try:
                return super().__call__(attn, *args, **kwargs)
            finally:
                hook.remove()

    with attnprobe.probe(pipe, dtype=torch.float32) as store:
        generate(pipe, family)
    check = store.meta["processor_check"]
    assert {v["verdict"] for v in check.values()} == {"equal"} and max(v["relative_error"] for v in check.values()) < 1e-5
    assert len(check) == len(store.sites)
    for attn in attns:
        attn.set_processor(DoubleKeys())
    try:
        plain = generate(pipe, family)
        with pytest.warns(attnprobe.AttnprobeWarning, match=rf"{len(sites)} site\(s\) .*: .* DoubleKeys is not"):
            with attnprobe.probe(pipe, dtype=torch.float32) as store:
                assert torch.equal(generate(pipe, family), plain)
    finally:
        for attn, original in zip(attns, originals):
            attn.set_processor(original)
    check = store.meta["processor_check"]
    assert {k for k, v in check.items() if v["verdict"] == "differs"} == set(sites)
    assert {check[k]["processor"] for k in sites} == {"DoubleKeys"}


def test_tiny_pipelines_by_name():
    from attnprobe.errors import ArgumentError
    from attnprobe.models.loader import TINY_MODELS
    from attnprobe.testing import TINY_PIPELINES

    assert {"sd", "sdxl", "sd3", "flux", "pixart", "pixart-sigma"} <= set(TINY_PIPELINES)
    assert {f"tiny-{name}" for name in TINY_PIPELINES} <= set(TINY_MODELS)
    with pytest.raises(ArgumentError, match=r"no tiny pipeline 'sd9'; there are \['sd', 'sdxl'"):
        tiny_pipeline("sd9")


def test_a_denoiser_that_adds_text_keys_of_its_own_is_refused_without_its_family(monkeypatch):
    """AuraFlow puts 8 register tokens before the text keys: without the family that says so (generic), labelling its
    keys from the prompt's positions would point every word 8 keys off, so the probe refuses."""
    from attnprobe.capture import families

    monkeypatch.setattr(families, "FAMILIES", tuple(f for f in families.FAMILIES if f.name != "auraflow"))
    pipe = tiny_pipeline("auraflow")
    before = processors(pipe)
    with pytest.raises(ProbeError, match="no attnprobe family covers AuraFlowTransformer2DModel.*allow_generic=True"):
        attnprobe.probe(pipe).__enter__()
    with pytest.raises(ProbeError, match="attends to 24 text keys, but the denoiser was called with 16 text positions"):
        with pytest.warns(attnprobe.AttnprobeWarning, match="structure alone"), attnprobe.probe(pipe, allow_generic=True):
            pipe(PROMPT, num_inference_steps=1, height=64, width=64, output_type="latent", max_sequence_length=16)
    assert processors(pipe) == before


def test_flux_kontext_input_image_tokens_are_keys_not_queries(pipes):
    """FluxKontextPipeline appends its input image's tokens (img_ids first coordinate 1) after the generated image's:
    the maps cover the generated image's grid, with the input image's keys in the same softmax (float64 reference
    from our own hooks over the whole sequence)."""
    from diffusers import FluxKontextPipeline

    flux = pipes["flux"]
    pipe = FluxKontextPipeline(**{k: v for k, v in flux.components.items() if v is not None})
    image = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(1))  # 2×4 tokens beside the 4×6 generated
    options = dict(OPTIONS["flux"], num_inference_steps=2, output_type="latent", _auto_resize=False, max_area=64 * 96)
    run = lambda: pipe(image=image, prompt=PROMPT, generator=torch.Generator().manual_seed(0), **options).images  # noqa: E731
    plain = run()
    sites = attnprobe.list_sites(pipe)
    seen = Inputs(pipe.transformer, [s.name for s in sites])
    try:
        with attnprobe.probe(pipe, dtype=torch.float32) as store:
            probed = run()
    finally:
        seen.close()
    assert torch.equal(plain, probed) and not store.flat_sites
    for site in sites:
        hidden, states, emb, mask = seen.seen[site.name][0]
        t = seen.text_len[0]
        n_all = (hidden.shape[1] - t) if site.kind == "single" else hidden.shape[1]
        assert n_all == 24 + 8  # generated 4×6, input 2×4
        probs, image_rows, text = full_softmax(pipe.transformer.get_submodule(site.name), site.kind, hidden, states,
                                               emb, t, mask)
        want = probs[:, :, image_rows, text][:, :, :24]
        got = store[site.name][0].flatten(2, 3).double()  # [sample, head, 4·6, T]
        assert got.shape[2] == 24 and (got - want).abs().max() <= 1e-6, site.name
        assert store.meta["processor_check"][site.name]["verdict"] == "equal"
    with pytest.raises(ProbeError, match="image keys are not image positions"):
        with attnprobe.probe(pipe, relations="image->image", points=(0.5, 0.5)):
            run()
