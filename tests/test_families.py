"""Families read at the attention kernel (``attnprobe.capture.kernel``): Sana (cross-attention to Gemma 2 with its
padding mask), Qwen-Image (joint attention over [text; image], complex rotary tables, masked padding) and Flux.2
(joint and parallel single-stream blocks, 4-axis rotary embeddings), with LLM encoders that read the prompt inside a
template. Tiny pipelines (``attnprobe.testing.tiny_pipeline``), CPU.

The float64 reference never touches attnprobe: our own pre-forward hooks keep each attention module's inputs; q and
k are recomputed from a float64 copy of the module's projections and norms, with our own rotary embeddings
(Qwen's complex one, Flux's interleaved pairs), and the softmax over all keys is taken in float64.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import pytest
import torch

import attnprobe
from attnprobe.errors import InterventionError, ProbeError
from attnprobe.interventions import AttentionEdit
from attnprobe.testing import tiny_pipeline
from test_joint import _rope64

PROMPT = "a picture of Dog"
SIZE = dict(height=32, width=48)
OPTIONS = {
    "sana": dict(height=32, width=64, max_sequence_length=16, use_resolution_binning=False),  # sides: multiples of 32
    "qwen": dict(SIZE, max_sequence_length=16),
    "flux2": dict(SIZE, max_sequence_length=16),
    "flux2-dev": dict(SIZE, max_sequence_length=64),  # its system message alone takes about 40 positions
    "cogview4": dict(height=32, width=64, max_sequence_length=16),
    "if": dict(SIZE, clean_caption=False, output_type="pt"),  # pixel space: no latents to hand back
    "hunyuandit": dict(SIZE, use_resolution_binning=False),
    "auraflow": dict(height=64, width=96, max_sequence_length=16),
}
#: (qh, qw): Sana's DC-AE 2× (32 × 64 px), Qwen's VAE 4× then 2×2 packing and Flux.2's 1× then 2×2 patches (32 × 48 px),
#: CogView4's VAE 8× then patch 2 (32 × 64 px), IF's pixel-space UNet at its second level (32 × 48 px), HunyuanDiT's
#: VAE 8× then patch 2 (32 × 48 px), AuraFlow's VAE 8× then patch 2 (64 × 96 px)
GRID = {"sana": (16, 32), "qwen": (4, 6), "flux2": (16, 24), "flux2-dev": (16, 24), "cogview4": (2, 4), "if": (16, 24),
        "hunyuandit": (2, 3), "auraflow": (4, 6)}


@pytest.fixture(scope="module")
def pipes():
    return {name: tiny_pipeline(name) for name in OPTIONS}


def generate(pipe, family, prompt=PROMPT, steps=2, **kwargs):
    options = dict(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0))
    options.update(OPTIONS[family], **kwargs)
    return pipe(prompt=prompt, **options).images


class Inputs:
    """Each attention module's call arguments (by name) per call, and the denoiser's text length per call."""

    def __init__(self, denoiser, names):
        self.seen = {n: [] for n in names}
        self.text_len = []
        self.handles = [denoiser.get_submodule(n).register_forward_pre_hook(self._keeper(n), with_kwargs=True)
                        for n in names]
        self.handles.append(denoiser.register_forward_pre_hook(
            lambda m, a, k: self.text_len.append(k["encoder_hidden_states"].shape[1]) if "encoder_hidden_states" in k
            else None, with_kwargs=True))

    def _keeper(self, name):
        def keep(module, args, kwargs):
            sig = inspect.signature(module.forward)
            bound = sig.bind_partial(*args, **kwargs).arguments
            for extra in [p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]:
                bound.update(bound.pop(extra, {}) or {})
            self.seen[name].append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                    for k, v in bound.items()})
        return keep

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()



def recorded_under_inputs(pipe, generate, prompt, probes=({},), around=contextlib.nullcontext, **kwargs):
    """One generation without a probe, one with the probes (``probes``: each one's options, fp32 maps unless said;
    opened one inside the other) under our own input hooks on every site of ``pipe.transformer`` and ``around()`` (a
    context of the caller's own, e.g. more hooks); ``generate(pipe, prompt, **kwargs)`` makes one. Returns ``(plain,
    frames, stores, inputs)``."""
    plain = generate(pipe, prompt, **kwargs)
    sites = [s.name for s in attnprobe.list_sites(pipe)]
    with around(), Inputs(pipe.transformer, sites) as seen, contextlib.ExitStack() as stack:
        stores = [stack.enter_context(attnprobe.probe(pipe, **{"dtype": torch.float32, **options}))
                  for options in probes]
        frames = generate(pipe, prompt, **kwargs)
    return plain, frames, stores, seen.seen

def _rope_pairs(x, emb):
    """Flux's rotary embedding on interleaved pairs, in float64 (test_joint's own, x: [batch, seq, head, d])."""
    return _rope64(x, tuple(e.double() for e in emb))


def _rope_halves(x, emb):
    """CogView4's rotary embedding on the two halves of each head (``use_real_unbind_dim=-2``), in float64."""
    cos, sin = (e.double()[:, None, :] for e in emb)
    real, imag = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
    return x * cos + torch.cat([-imag, real], dim=-1) * sin


def _rope_complex(x, freqs):
    """Qwen-Image's rotary embedding: consecutive pairs as complex numbers times the complex table (complex128)."""
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * freqs.to(torch.complex128)[None, :, None, :]).flatten(-2)


#: keys a denoiser adds before the text (AuraFlow's register tokens)
REGISTERS = {"auraflow": 8}


def reference(family, kind, attn, inputs, text_len):
    """The image-query × text-key block of the softmax over all keys, float64 ``[batch, head, image, text]``."""
    probs, image, text = full_softmax(family, kind, attn, inputs, text_len)
    return probs[:, :, image, text]


@torch.no_grad()
def full_softmax(family, kind, attn, inputs, text_len):
    """The softmax over all keys in float64, ``[batch, head, query, key]``, and its image and text slices (the
    query and key sequences are one, except for cross-attention and IF's added-KV attention)."""
    a = copy.deepcopy(attn).double()
    h = inputs["hidden_states"].double()
    heads = lambda x: x.unflatten(-1, (-1, a.head_dim if hasattr(a, "head_dim") else x.shape[-1] // a.heads))  # noqa: E731
    norm = lambda module, x: module(x) if module is not None else x  # noqa: E731
    bias = None
    if family == "if":  # added-KV: image queries over [text (add_k_proj); image (to_k)] keys
        h = a.group_norm(h.flatten(2).transpose(1, 2).transpose(1, 2)).transpose(1, 2)
        s = a.norm_encoder_hidden_states(inputs["encoder_hidden_states"].double())
        q, k = heads(a.to_q(h)), torch.cat([heads(a.add_k_proj(s)), heads(a.to_k(h))], 1)
        image, text = slice(None), slice(0, s.shape[1])
    elif family == "hunyuandit":  # cross-attention to [CLIP; T5] keys, the rotary embedding on the queries only
        q = _rope_pairs(norm(a.norm_q, heads(a.to_q(h))), inputs["image_rotary_emb"])
        k = norm(a.norm_k, heads(a.to_k(inputs["encoder_hidden_states"].double())))
        image, text = slice(None), slice(None)
    elif family == "sana":  # cross-attention; the transformer made the padding mask additive (-10000)
        q, k = norm(a.norm_q, heads(a.to_q(h))), norm(a.norm_k, heads(a.to_k(inputs["encoder_hidden_states"].double())))
        mask = inputs.get("attention_mask")
        bias = None if mask is None else mask.double().reshape(mask.shape[0], 1, 1, -1)
        image, text = slice(None), slice(None)
    elif family == "cogview4":  # [text; image] joined by the processor, rotary embedding on the image part only
        t = inputs["encoder_hidden_states"].shape[1]
        seq = torch.cat([inputs["encoder_hidden_states"].double(), h], 1)
        q, k = norm(a.norm_q, heads(a.to_q(seq))), norm(a.norm_k, heads(a.to_k(seq)))
        emb = inputs["image_rotary_emb"]
        q = torch.cat([q[:, :t], _rope_halves(q[:, t:], emb)], 1)
        k = torch.cat([k[:, :t], _rope_halves(k[:, t:], emb)], 1)
        image, text = slice(t, None), slice(0, t)
    elif family == "auraflow":  # [registers; text; image]: the registers share the softmax, they are not text
        r = REGISTERS[family]
        if kind == "single":  # the joined sequence is the block's hidden_states
            q, k = norm(a.norm_q, heads(a.to_q(h))), norm(a.norm_k, heads(a.to_k(h)))
        else:
            s = inputs["encoder_hidden_states"].double()
            tq, tk = norm(a.norm_added_q, heads(a.add_q_proj(s))), norm(a.norm_added_k, heads(a.add_k_proj(s)))
            q = torch.cat([tq, norm(a.norm_q, heads(a.to_q(h)))], 1)
            k = torch.cat([tk, norm(a.norm_k, heads(a.to_k(h)))], 1)
        image, text = slice(r + text_len, None), slice(r, r + text_len)
    elif kind == "single":  # Flux.2: [text; image] through one fused projection
        q, k, _ = a.to_qkv_mlp_proj(h)[..., :3 * a.inner_dim].chunk(3, dim=-1)
        q, k = _rope_pairs(norm(a.norm_q, heads(q)), inputs["image_rotary_emb"]), _rope_pairs(
            norm(a.norm_k, heads(k)), inputs["image_rotary_emb"])
        image, text = slice(text_len, None), slice(0, text_len)
    else:  # joint: image through to_q/to_k, text through add_q_proj/add_k_proj, [text; image]
        s = inputs["encoder_hidden_states"].double()
        q, k = norm(a.norm_q, heads(a.to_q(h))), norm(a.norm_k, heads(a.to_k(h)))
        tq, tk = norm(a.norm_added_q, heads(a.add_q_proj(s))), norm(a.norm_added_k, heads(a.add_k_proj(s)))
        t = s.shape[1]
        emb = inputs["image_rotary_emb"]
        if family == "qwen":
            q, k = _rope_complex(q, emb[0]), _rope_complex(k, emb[0])
            tq, tk = _rope_complex(tq, emb[1]), _rope_complex(tk, emb[1])
            q, k = torch.cat([tq, q], 1), torch.cat([tk, k], 1)
            mask = inputs.get("encoder_hidden_states_mask")
            if mask is not None:
                keep = torch.cat([mask.bool(), torch.ones(mask.shape[0], h.shape[1], dtype=torch.bool)], 1)
                bias = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))[:, None, None]
        else:
            q, k = _rope_pairs(torch.cat([tq, q], 1), emb), _rope_pairs(torch.cat([tk, k], 1), emb)
        image, text = slice(t, None), slice(0, t)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1), image, text


# ---------------------------------------------------------------------------------------------- maps
@pytest.mark.parametrize("family", list(OPTIONS))
def test_maps_equal_a_float64_reference_and_images_stay_bit_identical(pipes, family):
    pipe = pipes[family]
    sites = attnprobe.list_sites(pipe)
    plain = generate(pipe, family, guidance_scale=1.0 if family == "sana" else 4.0)
    with Inputs(attnprobe.capture.denoiser_of(pipe), [s.name for s in sites]) as seen:
        with attnprobe.probe(pipe, dtype=torch.float32, passes="all" if family == "sana" else "cond") as exact:
            probed = generate(pipe, family, guidance_scale=1.0 if family == "sana" else 4.0)
    assert torch.equal(plain, probed)
    assert exact.meta["family"] == {"if": "deepfloyd", "flux2-dev": "flux2"}.get(family, family)
    if family == "auraflow":  # its registers are not on the token axis
        assert len(exact.tokens(0)) == seen.text_len[0] == 16
    assert all(c["verdict"] == "equal" for c in exact.meta["processor_check"].values())
    for site in sites:
        attn = attnprobe.capture.denoiser_of(pipe).get_submodule(site.name)
        for call in range(len(exact.calls)):
            index = exact.calls[call].index
            want = reference(family, site.kind, attn, seen.seen[site.name][index], seen.text_len[index])
            got = exact[site.name][call].flatten(2, 3).double()  # [sample, head, image, text]
            assert got.shape[2] == GRID[family][0] * GRID[family][1]
            assert (got - want[[s.row for s in exact.samples]]).abs().max() <= 1e-6, (site.name, call)
            share = got.sum(-1)
            if site.kind == "cross":
                assert torch.allclose(share, torch.ones(()).double(), atol=1e-5)
            else:
                assert ((share > 0) & (share <= 1 + 1e-6)).all()
    assert exact[sites[0].name].shape[-3:-1] == GRID[family]


@pytest.mark.parametrize("family", list(OPTIONS))
def test_bf16_images_stay_bit_identical(family):
    pipe = tiny_pipeline(family, dtype=torch.bfloat16)
    plain = generate(pipe, family)
    with attnprobe.probe(pipe) as store:
        probed = generate(pipe, family)
    assert torch.equal(plain, probed) and len(store.calls) == 2
    assert all(c["verdict"] == "equal" for c in store.meta["processor_check"].values())


def test_renorm_is_exact_over_its_text_share(pipes):
    pipe = pipes["qwen"]
    with attnprobe.probe(pipe, dtype=torch.float32) as exact:
        generate(pipe, "qwen")
    with attnprobe.probe(pipe, dtype=torch.float32, joint="renorm") as renorm:
        generate(pipe, "qwen")
    site = exact.sites[0].name
    e, r = exact[site].double(), renorm[site].double()
    assert torch.allclose(e / e.sum(-1, keepdim=True), r, atol=1e-6)
    assert torch.allclose(r.sum(-1), torch.ones(()).double(), atol=1e-6)


@pytest.mark.filterwarnings("error::attnprobe.AttnprobeWarning")
def test_lumina2_rows_of_other_text_lengths_against_a_float64_reference():
    """Lumina 2 joins each row's attended caption with the image: rows of other prompt lengths put their image at
    other positions; text keys past a row's caption get 0. Reference: our hooks, our complex RoPE, float64."""
    pipe = tiny_pipeline("lumina2")
    prompts = ["a picture of dog", "a much longer picture of a brown dog on the grass"]
    kwargs = dict(num_inference_steps=2, height=64, width=96, output_type="latent", max_sequence_length=64)
    plain = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    sites = attnprobe.list_sites(pipe)
    lens = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: lens.append(k["encoder_attention_mask"].sum(-1).tolist()), with_kwargs=True)
    try:
        with Inputs(pipe.transformer, [s.name for s in sites]) as seen, attnprobe.probe(
                pipe, dtype=torch.float32) as store:
            probed = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        hook.remove()
    assert torch.equal(plain, probed) and [s.kind for s in sites] == ["single", "single"]
    assert [c.timestep for c in store.calls] == [1000.0, 500.0]  # it hands the transformer 1 − t / 1000
    assert lens[0][0] < lens[0][1] and store.token_indices(0, "dog") == [[46]] and store.token_indices(1, "dog") == [[50]]
    for site in sites:
        a = copy.deepcopy(pipe.transformer.get_submodule(site.name)).double()
        for call in range(len(store.calls)):
            inputs = seen.seen[site.name][store.calls[call].index]
            h = inputs["hidden_states"].double()
            q = a.norm_q(a.to_q(h).unflatten(-1, (a.heads, -1)))
            k = a.norm_k(a.to_k(h).unflatten(-1, (-1, q.shape[-1])))
            freqs = inputs["image_rotary_emb"].to(torch.complex128)[:, :, None, :]
            rope = lambda x: torch.view_as_real(  # noqa: E731
                torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous()) * freqs).flatten(-2)
            q, k = rope(q), rope(k).repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * a.scale
            mask = inputs.get("attention_mask")
            if mask is not None:
                logits = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
            probs = logits.softmax(-1)
            got = store[site.name][call].flatten(2, 3).double()  # [sample, head, image, token]
            n_image = got.shape[2]
            for row, length in enumerate(lens[store.calls[call].index]):
                want = torch.zeros_like(got[row])
                want[..., :length] = probs[row, :, length:length + n_image, :length]
                assert (got[row] - want).abs().max() <= 1e-6, (site.name, call, row)
    with attnprobe.probe(pipe) as alone:  # one short caption: its sequence ends before the 64 token positions do
        pipe(prompt=prompts[0], generator=torch.Generator().manual_seed(0), **kwargs)
    assert (alone[sites[0].name][..., lens[0][0]:] == 0).all() and alone.token_indices(0, "dog") == [[46]]


# ---------------------------------------------------------------------------------------------- tokens
def test_template_tokens_are_labelled_and_only_the_users_words_are_searched(pipes):
    stores = {}
    for family in OPTIONS:
        with attnprobe.probe(pipes[family], passes="all" if family == "sana" else "cond") as stores[family]:
            generate(pipes[family], family, prompt="a dog, a Dog")
    qwen = stores["qwen"].tokens(0)
    assert qwen[:6] == ["a", "dog", ",", "a", "Dog", "<|im_end|>"] and qwen[6:8] == ["<|im_start|>", "assistant"]
    flux2 = stores["flux2"].tokens(0)
    assert flux2[:2] == ["<|im_start|>", "user"] and flux2[2:7] == ["a", "dog", ",", "a", "Dog"]
    sana = stores["sana"]
    cond = next(s.index for s in sana.samples if s.pass_label == "cond")
    assert sana.tokens(cond)[:2] == ["<bos>", ":"]  # the instruction's last position, then the user's words
    assert sana.token_kinds(cond)[:3] == ["start", "template", "word"]
    # both mentions, in the user's words only ("Dog" in the template would not count)
    assert stores["qwen"].token_indices(0, "dog") == [[1], [4]]
    assert stores["flux2"].token_indices(0, "dog") == [[3], [6]]
    assert sana.token_indices(cond, "dog") == [[3], [6]]
    assert stores["qwen"].token_kinds(0)[:6] == ["word"] * 5 + ["template"]
    assert stores["flux2"].token_kinds(0)[-1] == "pad"
    cog = stores["cogview4"]  # GLM: left padding to a multiple of 16, then [gMASK]<sop> (here <bos>) and the words
    assert cog.token_kinds(0)[0] == "pad" and cog.tokens(0)[-6:] == ["<bos>", "a", "dog", ",", "a", "Dog"]
    assert cog.token_indices(0, "dog") == [[12], [15]]
    hunyuan = stores["hunyuandit"]  # 77 CLIP positions, then 256 T5 ones: each mention in both streams
    assert hunyuan.token_indices(0, "dog") == [[2, 78], [5, 81]] and len(hunyuan.tokens(0)) == 77 + 256


def test_sana_uncond_is_read_without_the_instruction_and_pads_get_nothing(pipes):
    pipe = pipes["sana"]
    with attnprobe.probe(pipe, passes="all", dtype=torch.float32) as store:
        generate(pipe, "sana")
    uncond = next(s for s in store.samples if s.pass_label == "uncond")
    assert store.tokens(uncond.index)[0] == "<bos>" and set(store.tokens(uncond.index)[1:]) == {"<|endoftext|>"}
    cond = next(s for s in store.samples if s.pass_label == "cond")
    words = len(store.tokens(cond.index)) - store.tokens(cond.index).count("<|endoftext|>")
    maps = store[store.sites[0].name][:, cond.index]
    assert (maps[..., words:] == 0).all()  # padding masked out: probability 0


def test_a_template_attnprobe_does_not_know_leaves_tokens_unknown_with_a_warning(pipes):
    pipe = pipes["sana"]
    with pytest.warns(attnprobe.AttnprobeWarning, match="template"):
        with attnprobe.probe(pipe) as store:
            generate(pipe, "sana", complex_human_instruction=["Describe the picture: "])
    assert set(store.tokens(0)) == {""}
    with pytest.raises(attnprobe.ConceptError):
        store.token_indices(0, "dog")


def test_kolors_unet_keys_are_chatglm_positions_left_padded(attn_inputs, check_maps):
    """Kolors: the UNet family (hook reader) with a ChatGLM encoder: its keys are ChatGLM's 256 positions, padded on
    the left, through the UNet's text projection; maps against our own float64 recompute, images bit-identical."""
    pipe = tiny_pipeline("kolors")
    kwargs = dict(num_inference_steps=2, height=64, width=96, output_type="latent")
    plain = pipe(prompt="a picture of Dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    names = [s.name for s in attnprobe.list_sites(pipe)][:3]
    with attn_inputs(pipe.unet, names) as seen, attnprobe.probe(pipe, sites=names, passes="all",
                                                                dtype=torch.float32) as store:
        probed = pipe(prompt="a picture of Dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(plain, probed) and store.meta["family"] == "unet"
    check_maps(store, seen)
    cond = next(s.index for s in store.samples if s.pass_label == "cond")
    assert store.tokens(cond)[-5:] == ["<bos>", "a", "picture", "of", "Dog"] and store.token_kinds(cond)[0] == "pad"
    assert store.token_indices(cond, "dog") == [[255]] and store[names[0]].shape[-3:] == (4, 6, 256)
    # an attention edit finds the concept where the left-padded keys put it; re-encoding ChatGLM is refused up front
    with attnprobe.intervene(pipe, AttentionEdit(0.0), "a picture of Dog", concept="dog") as run, attnprobe.probe(
            pipe, sites=names, dtype=torch.float32) as edited:
        run(generator=torch.Generator().manual_seed(0), **kwargs)
    assert (edited[names[0]][..., 255] == 0).all() and (edited[names[0]][..., 254] > 0).any()
    assert "ChatGLMModel" in attnprobe.text.text_unsupported(pipe)
    with pytest.raises(InterventionError, match="ChatGLMModel"):
        with attnprobe.intervene(pipe, "pad-conditioning", "a picture of Dog", concept="dog"):
            pass


def test_qwen_labels_follow_the_pipeline_through_left_padding_and_its_own_cut(pipes):
    pipe = copy.deepcopy(pipes["qwen"])
    pipe.tokenizer.padding_side = "left"  # the pipeline drops the padding first, then the template's positions
    with attnprobe.probe(pipe) as store:
        generate(pipe, "qwen", prompt=["a dog", "a picture of a big brown dog on grass"])
    assert store.tokens(0)[:3] == ["a", "dog", "<|im_end|>"] and store.token_indices(0, "dog") == [[1]]
    assert store.token_kinds(0)[-1] == "pad"
    # the pipeline keeps max_sequence_length positions of what it encoded: a mention past them was never seen
    with attnprobe.probe(pipes["qwen"]) as store:
        generate(pipes["qwen"], "qwen", prompt="dog " + "word " * 30 + "dog")
    assert store.layout(0).truncated_at is not None
    with pytest.raises(attnprobe.ConceptError, match="past the maximum length"):
        store.token_indices(0, "dog")


def test_sana_prompt_embeds_of_an_unknown_template_are_not_guessed(pipes):
    pipe = pipes["sana"]
    prompts = ["a picture of a dog"]
    with torch.no_grad():  # encode_prompt's own default: no complex human instruction
        embeds, mask, negative, negative_mask = pipe.encode_prompt(prompts, max_sequence_length=16)
    with pytest.warns(attnprobe.AttnprobeWarning, match="template"):
        with attnprobe.probe(pipe, prompts=prompts) as store:
            generate(pipe, "sana", prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                     negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)
    assert store.samples[0].text == prompts[0] and set(store.token_kinds(0)) == {"unknown"}
    with pytest.raises(attnprobe.ConceptError, match="template attnprobe does not know"):
        store.token_indices(0, "dog")


def test_token_positions_of_a_separate_uncond_pass_count_its_own_keys(pipes):
    pipe = pipes["qwen"]
    negative = "ugly blurry dark low quality picture of a cat"
    with attnprobe.probe(pipe, passes="uncond", tokens=[-1]) as store:
        generate(pipe, "qwen", prompt="a dog", negative_prompt=negative, true_cfg_scale=3.0)
    assert store.tokens(0) == ["assistant"]


def test_a_compiled_kernel_read_denoiser_is_refused(pipes):
    pipe = copy.deepcopy(pipes["qwen"])
    pipe.transformer.compile(backend="eager")
    with pytest.raises(ProbeError, match="compiled"):
        with attnprobe.probe(pipe):
            generate(pipe, "qwen", steps=1)


# ---------------------------------------------------------------------------------------------- passes
def test_qwen_true_cfg_passes_are_separate_calls_labelled_apart(pipes):
    pipe = pipes["qwen"]
    with attnprobe.probe(pipe, passes="cond") as cond, attnprobe.probe(pipe, passes="uncond") as uncond:
        generate(pipe, "qwen", negative_prompt="blurry", true_cfg_scale=3.0)
    assert [s.pass_label for s in cond.samples] == ["cond"] and [s.pass_label for s in uncond.samples] == ["uncond"]
    assert uncond.samples[0].text == "blurry" and uncond.tokens(0)[0] == "blurry"
    assert len(cond.calls) == len(uncond.calls) == 2


def test_timesteps_of_an_expanded_batch_are_the_schedulers(pipes):
    """CogView4 hands the transformer ``t.expand(batch)``; its last timestep is 1.0, which is not a Flux ``t / 1000``."""
    pipe = pipes["cogview4"]
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(float(k["timestep"].reshape(-1)[0])), with_kwargs=True)
    try:
        with attnprobe.probe(pipe) as store:
            generate(pipe, "cogview4", prompt=["a dog", "a cat"], steps=3)
    finally:
        hook.remove()
    assert [c.timestep for c in store.calls] == seen[::2] and seen[-1] == 1.0  # the cond calls of each step


def test_the_study_runs_with_true_guidance_and_without_latents(tmp_path):
    """Qwen-Image ignores guidance_scale: the study's guidance is its true CFG (an empty negative prompt, separate
    calls); DeepFloyd IF takes no latents: every variant starts from one generator per image, seeded alike;
    HunyuanDiT would bin the study's size to its own table."""
    from attnprobe.study import cli
    from attnprobe.study.measure import guided, negatives

    qwen = tiny_pipeline("qwen")
    assert negatives(guided(qwen, {"guidance_scale": 4.0}), 2) == {
        "guidance_scale": 4.0, "true_cfg_scale": 4.0, "negative_prompt": ["", ""]}
    for model in ("tiny-if", "tiny-hunyuandit"):  # HunyuanDiT: its resolution binning off, so --size holds
        out = tmp_path / model
        assert cli.main(["study", "--model", model, "--out", str(out), "--concepts", "dog", "--seeds", "0", "--steps",
                         "2", "--size", "32", "--variants", "baseline,instruction", "--scorer", "none",
                         "--no-progress"]) == 0
        assert (out / "failures.csv").read_text().splitlines() == ["model,concept,seed,error,detail"]
        assert len((out / "auc.csv").read_text().splitlines()) == 3


# ---------------------------------------------------------------------------------------------- refusals
class _TwoKernels:
    """A processor that runs attention twice (as IP-Adapter-style processors do): which call is the map?"""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, *args, **kwargs):
        q = torch.zeros(1, 1, 2, 4)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return self.inner(attn, hidden_states, *args, **kwargs)


def test_a_processor_with_two_attention_kernels_is_refused(pipes):
    pipe = pipes["qwen"]
    attn = pipe.transformer.transformer_blocks[0].attn
    inner = attn.processor
    attn.set_processor(_TwoKernels(inner))
    try:
        with pytest.raises(ProbeError, match="scaled_dot_product_attention 2 times"):
            with attnprobe.probe(pipe):
                generate(pipe, "qwen")
    finally:
        attn.set_processor(inner)


def test_video_audio_and_prior_denoisers_and_unknown_ones_are_refused_before_they_run():
    """A video denoiser without a family (Wan 2.1's image-to-video one, whose attn2 also attends to image tokens), a
    prior with no image positions: recording either would be wrong, so the probe refuses before anything runs and
    names why; a denoiser no family covers is refused too unless the user asks for the generic reading (then with a
    warning)."""
    from diffusers import PriorTransformer, WanTransformer3DModel
    from diffusers.models.attention_processor import Attention

    from attnprobe.models.coverage import pipeline_verdicts

    wan = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                text_dim=8, freq_dim=8, ffn_dim=8, num_layers=1, rope_max_seq_len=32, image_dim=8)
    with pytest.raises(ProbeError, match="WanTransformer3DModel is Wan 2.1 or SkyReels-V2 image-to-video.*CLIP image tokens"):
        attnprobe.probe(wan).__enter__()
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8,
                             num_embeddings=4, additional_embeddings=4)
    with pytest.raises(ProbeError, match="PriorTransformer is a CLIP-embedding prior.*no image positions"):
        attnprobe.probe(prior, allow_generic=True).__enter__()  # refused whatever the user allows

    class MyDiT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(query_dim=8, cross_attention_dim=8, heads=2, dim_head=4)

    with pytest.raises(ProbeError, match="no attnprobe family covers MyDiT.*allow_generic=True"):
        attnprobe.probe(MyDiT()).__enter__()
    verdicts = {v.pipeline: v for v in pipeline_verdicts()}
    assert verdicts["AnimateDiffPipeline"].family == "animatediff"  # its UNet2DConditionModel becomes a UNetMotionModel
    assert verdicts["WanImageToVideoPipeline"].verdict.startswith("refused: Wan 2.1 or SkyReels-V2 image-to-video")
    assert verdicts["LTX2Pipeline"].verdict.startswith("refused: LTX-2")  # LTX-Video (LTXPipeline) is recorded
    assert verdicts["StableAudioPipeline"].family == "audio"
    assert not [v for v in verdicts.values() if "untested" in v.verdict and v.family == "generic"]


def test_flux2_dev_system_message_is_template_and_guidance_is_an_embedding(pipes):
    """Flux.2 [dev] reads its system message before the prompt (its words are kind 'template', never a mention) and
    takes guidance_scale as an embedding: one pass per call, labelled cond, however high the scale."""
    pipe = pipes["flux2-dev"]
    with attnprobe.probe(pipe) as store:
        generate(pipe, "flux2-dev", prompt="an image of a dog", steps=1, guidance_scale=4.0)
    assert [s.pass_label for s in store.samples] == ["cond"]
    kinds, strings = store.token_kinds(0), store.tokens(0)
    assert "image" in [s for s, k in zip(strings, kinds) if k == "template"]  # "reasons about image descriptions"
    (mention,) = store.token_indices(0, "image")
    assert kinds[mention[0]] == "word" and strings[mention[0]] == "image"
