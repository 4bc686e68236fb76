"""PRX (image queries over [text; image] keys, the text masked on padding, guidance batched with the negative prompt
and the prompt encoded in one encoder call; tiny pipelines, ``attnprobe.testing.tiny_pipeline``, CPU) and the
refusal of Qwen-Image 2.1.

The float64 reference never touches attnprobe: our own pre-forward hooks keep each attention module's inputs, q and k
are recomputed from a float64 copy of the module with our own rotation of the image positions (cos and sin read from
the model's table), and the softmax over all keys of each row is taken in float64 with the text padding masked.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from attnprobe.capture.families import checked_family, family_of
from attnprobe.errors import InterventionError, ProbeError
from attnprobe.interventions import AttentionEdit, intervene
from attnprobe.models.coverage import pipeline_verdicts
from attnprobe.testing import tiny_pipeline
from test_more_families import _recorded

SIZE = dict(num_inference_steps=2, height=64, width=96, output_type="latent", use_resolution_binning=False)


@pytest.fixture(scope="module")
def prx():
    return tiny_pipeline("prx")


def _rotate(x, pe):
    """RoPE of ``x`` ``[batch, position, head, d]`` with PRX's table ``pe`` ``[batch, 1, position, d/2, 2, 2]`` (the
    rotation of each channel pair by the angle whose cos and sin it holds)."""
    cos, sin = pe[:, 0, :, None, :, 0, 0].double(), pe[:, 0, :, None, :, 1, 0].double()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


@torch.no_grad()
def _check_prx(pipe, store, sites, seen):
    """Every recorded call and site against the float64 softmax over ``[text; image]`` keys at the image queries; the
    masked padding gets 0 and each query's row sums to its text share (``exact``)."""
    for site in sites:
        a = copy.deepcopy(pipe.transformer.get_submodule(site.name)).double()
        for call in range(len(store.calls)):
            inputs = seen.seen[site.name][store.calls[call].index]
            h, e = inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double()
            q, k, _ = a.img_qkv_proj(h).unflatten(-1, (3, a.heads, -1)).unbind(2)  # [batch, position, head, d] each
            text_k = a.norm_added_k(a.txt_kv_proj(e).unflatten(-1, (2, a.heads, -1))[:, :, 0])
            q, k = _rotate(a.norm_q(q), inputs["image_rotary_emb"]), _rotate(a.norm_k(k), inputs["image_rotary_emb"])
            keys = torch.cat([text_k, k], dim=1)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) * q.shape[-1] ** -0.5
            mask = inputs["attention_mask"]
            n_text = e.shape[1]
            logits[:, :, :, :n_text] = logits[:, :, :, :n_text].masked_fill(~mask[:, None, None, :], float("-inf"))
            probs = logits.softmax(-1)[[s.row for s in store.samples]][:, :, :, :n_text]
            got = store[site.name][call].flatten(2, 3).double()
            assert got.shape == probs.shape and (got - probs).abs().max() <= 1e-6, (site.name, call)
            assert all((got[i][..., ~mask[s.row]] == 0).all() for i, s in enumerate(store.samples))
            assert (got.sum(-1) < 1 - 1e-3).all()  # the image keys take the rest


def test_prx_guided_batch_against_a_float64_reference(prx):
    """Guidance on: the negative prompt and the prompt encoded in one call, the batch [uncond; cond]; the keys
    ``<bos>``, the words, padding; a non-square 64×96 px image gives a 4×6 query grid (8× VAE, 2×2 patches)."""
    plain, store, seen, sites = _recorded(prx, "A picture of dog", "all", guidance_scale=4.0, **SIZE)
    assert [s.name for s in sites] == ["blocks.0.attention", "blocks.1.attention"] and {s.kind for s in sites} == {"joint"}
    assert [(s.pass_label, s.row, s.text) for s in store.samples] == [("uncond", 0, ""), ("cond", 1, "a picture of dog")]
    assert [c.layout for c in store.calls] == [("uncond", "cond")] * 2
    assert store.meta["row_evidence"] == "encode_prompt"
    assert store[sites[0].name].shape == (2, 2, 2, 4, 6, 16)
    kinds = store.token_kinds(1)
    assert kinds[:5] == ["start", "word", "word", "word", "word"] and set(kinds[5:]) == {"pad"}
    assert store.tokens(1)[1:5] == ["a", "picture", "of", "dog"]  # as the pipeline cleaned it: lower-cased
    assert store.token_indices(1, "dog") == [[4]] and store.token_kinds(0)[1:] == ["pad"] * 15
    assert all(v["verdict"] == "equal" for v in store.meta["processor_check"].values())
    _check_prx(prx, store, sites, seen)


def test_prx_two_prompts_without_guidance_against_a_float64_reference(prx):
    """Guidance off (``guidance_scale=1``): one conditional row per prompt, each its own words."""
    _, store, seen, sites = _recorded(prx, ["a picture of dog", "a brown dog"], "cond", guidance_scale=1.0, **SIZE)
    assert [(s.pass_label, s.prompt_index, s.row) for s in store.samples] == [("cond", 0, 0), ("cond", 1, 1)]
    assert store.token_indices(0, "dog") == [[4]] and store.token_indices(1, "dog") == [[3]]
    _check_prx(prx, store, sites, seen)


def test_prx_ignored_negative_embeddings_do_not_shift_the_labels(prx):
    """PRX encodes its own negative prompt with the prompt and ignores ``negative_prompt_embeds``: the conditional row
    is still labelled with the prompt's ids, not the negative's."""
    _, _, negative, _ = prx.encode_prompt("a red cat", do_classifier_free_guidance=True)
    with attnprobe.probe(prx, passes="all") as store:
        prx(prompt="a picture of dog", negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(0),
            **SIZE)
    assert [s.text for s in store.samples] == ["", "a picture of dog"] and store.token_indices(1, "dog") == [[4]]


def test_prx_bf16_images_unchanged_and_edits_refused():
    """bf16: images bit-identical with the probe on. The attention and conditioning edits are refused (joint
    attention: the concept's keys share the softmax with the image keys)."""
    pipe = tiny_pipeline("prx", dtype=torch.bfloat16)
    run = lambda: pipe(prompt="a picture of dog", generator=torch.Generator().manual_seed(0), **SIZE).images  # noqa: E731
    plain = run()
    with attnprobe.probe(pipe) as store:
        probed = run()
    assert torch.equal(plain, probed) and store.token_indices(store.samples[0].index, "dog") == [[4]]
    with pytest.raises(InterventionError, match="'prx' family.*joint attention"):
        intervene(pipe, AttentionEdit(0.0, renormalize=False), "a picture of dog", concept="dog").__enter__()


def test_qwen_image_21_is_refused_naming_why():
    """Qwen-Image 2.1's block-causal sequence and KV cache: refused before anything runs, saying so; PRX tested, its
    pixel-space pipeline on the same family's path."""
    from diffusers import QwenImage21Transformer2DModel

    with torch.device("meta"):
        denoiser = QwenImage21Transformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                                 context_in_dim=16, in_channels=4, axes_dims_rope=(2, 2, 4))
    assert family_of(denoiser).name == "qwen-image-2.1"
    with pytest.raises(ProbeError, match=r"Qwen-Image 2\.1 .*block-causal.*KV cache"):
        checked_family(denoiser, denoiser, allow_generic=True)
    verdicts = {v.pipeline: v for v in pipeline_verdicts()}
    assert verdicts["QwenImage21Pipeline"].verdict.startswith("refused: Qwen-Image 2.1")
    assert verdicts["PRXPipeline"].verdict.startswith("tested")
    assert verdicts["PRXPixelPipeline"].verdict == "family prx, untested"
