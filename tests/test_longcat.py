"""LongCat-Image (``LongCatImagePipeline``, ``LongCatImageTransformer2DModel``) on its tiny pipeline, CPU: Flux-like
``[text; image]`` attention with RoPE on both (image ids from 512 on), read at the kernel; Qwen2.5-VL keys assembled
from pieces (a template prefix, the prompt with quoted text one character at a time, padding, a suffix; the keys are
the prompt's positions and the padding); guidance as separate calls, conditional first, the default negative prompt
encoded once for every row; the pipeline's prompt rewriting refused before it generates.

The float64 references never touch attnprobe: our own pre-forward hooks keep each attention module's inputs, q and k
are recomputed from a float64 copy of the module with the model's rotary tables, and the softmax over all keys of
each row is taken in float64 (``test_more_families._check_text_first_rope``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from attnprobe.capture.denoiser_call import packed_grid
from attnprobe.capture.encoders import pipeline_encoding
from attnprobe.errors import ProbeError
from attnprobe.models.coverage import pipeline_verdicts
from attnprobe.testing import tiny_pipeline
from test_more_families import _check_text_first_rope, _recorded, _rotate_image

N_TEXT = 16  # the tiny pipeline's tokenizer_max_length (the real one: 512)
KWARGS = dict(num_inference_steps=2, height=64, width=96, output_type="latent", enable_prompt_rewrite=False)
PROMPTS = ["a picture of dog", "a sign that says 'dog' by a dog"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("longcat")


def _text_share(pipe, store, site, seen, call):
    """Per sample, head and image query, the float64 softmax's mass on the text keys at ``site`` (a joint one)."""
    a = copy.deepcopy(pipe.transformer.get_submodule(site.name)).double()
    inputs = seen.seen[site.name][store.calls[call].index]
    heads = lambda x: x.unflatten(-1, (a.heads, -1))  # noqa: E731
    h, e = inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double()
    q = torch.cat([a.norm_added_q(heads(a.add_q_proj(e))), a.norm_q(heads(a.to_q(h)))], dim=1)
    k = torch.cat([a.norm_added_k(heads(a.add_k_proj(e))), a.norm_k(heads(a.to_k(h)))], dim=1)
    cos, sin = inputs["image_rotary_emb"]
    q, k = _rotate_image(q, cos, sin, q.shape[1]), _rotate_image(k, cos, sin, k.shape[1])
    probs = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
    return probs[[s.row for s in store.samples]][:, :, e.shape[1]:, :e.shape[1]].sum(-1)


@torch.no_grad()
def test_conditional_keys_sums_and_grid_against_a_float64_reference(pipe):
    """The conditional calls (guidance on: separate calls, conditional first) of two prompts: the words, quoted text
    one key per character, then padding; the exact map's rows sum to the text share; a 64 × 96 px image is a 4 × 6
    grid of packed tokens although the image's position ids start at 512."""
    _, store, seen, sites = _recorded(pipe, PROMPTS, "cond", **KWARGS)
    assert [(s.name, s.kind) for s in sites] == [("transformer_blocks.0.attn", "joint"),
                                                 ("single_transformer_blocks.0.attn", "single"),
                                                 ("single_transformer_blocks.1.attn", "single")]
    assert [c.layout for c in store.calls] == [("cond", "cond")] * 2 and store.meta["separate_uncond_calls"]
    assert [(s.pass_label, s.prompt_index, s.text) for s in store.samples] == [("cond", 0, PROMPTS[0]),
                                                                               ("cond", 1, PROMPTS[1])]
    assert store.meta["family"] == "longcat" and store.meta["image_size"] == [64, 96]
    assert store[sites[0].name].shape[1:] == (2, 2, 4, 6, N_TEXT)  # call, sample, head, qh, qw, token
    assert store.token_indices(0, "dog") == [[3]] and store.token_kinds(0) == ["word"] * 4 + ["pad"] * 12
    assert store.tokens(1)[4:9] == ["'", "d", "o", "g", "'"]  # quoted text tokenized one character at a time
    assert store.token_indices(1, "dog") == [[5, 6, 7], [11]] and store.token_kinds(1)[11:13] == ["word", "pad"]
    _check_text_first_rope(pipe, store, sites, seen, N_TEXT)
    for call in range(len(store.calls)):
        got = store[sites[0].name][call].flatten(2, 3).double().sum(-1)  # sample, head, query
        want = _text_share(pipe, store, sites[0], seen, call)
        assert (got - want).abs().max() <= 1e-6 and bool((got < 1).all()) and bool((got > 0).all())


@torch.no_grad()
def test_keys_are_the_encoders_positions_between_its_template_prefix_and_suffix(pipe):
    """The encoder reads [template prefix; words; padding; template suffix] (the prefix and suffix labelled
    ``template``); the keys are what the pipeline keeps, the words and padding, checked against the ids it read."""
    ids = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, a, k: ids.append(k["input_ids"][0].tolist()),
                                                       with_kwargs=True)
    try:
        enc = pipeline_encoding(pipe, PROMPTS[1])
    finally:
        hook.remove()
    read = enc.encoders[0].layout
    prefix = len(pipe.tokenizer(pipe.prompt_template_encode_prefix, add_special_tokens=False).input_ids)
    suffix = len(pipe.tokenizer(pipe.prompt_template_encode_suffix, add_special_tokens=False).input_ids)
    assert read.ids == ids[0] and len(ids[0]) == prefix + N_TEXT + suffix
    assert read.kinds == ["template"] * prefix + ["word"] * 12 + ["pad"] * 4 + ["template"] * suffix
    assert enc.layout.ids == ids[0][prefix:prefix + N_TEXT] and enc.layout.kinds == read.kinds[prefix:prefix + N_TEXT]
    assert tuple(enc.conditioning.shape) == (N_TEXT, 16)
    long = "a long prompt of many words about a dog that goes on and on past sixteen tokens dog end"
    cut = pipeline_encoding(pipe, long).layout
    assert cut.kinds == ["word"] * N_TEXT and cut.truncated_at == long.index("tokens")


@torch.no_grad()
def test_unconditional_rows_of_a_broadcast_negative_and_of_negative_prompts(pipe):
    """The default negative prompt ("") is encoded once for every row (the denoiser broadcasts it): each row is
    labelled ``uncond`` for its prompt, every key padding; negative prompts per prompt label their words; both
    against the float64 reference. Both passes in one store are refused (separate calls)."""
    _, store, seen, sites = _recorded(pipe, PROMPTS, "uncond", **KWARGS)
    assert [c.layout for c in store.calls] == [("uncond", "uncond")] * 2 and [c.index for c in store.calls] == [1, 3]
    assert [(s.pass_label, s.prompt_index) for s in store.samples] == [("uncond", 0), ("uncond", 1)]
    assert store.token_kinds(1) == ["pad"] * N_TEXT and seen.text_len == [N_TEXT] * 4
    _check_text_first_rope(pipe, store, sites, seen, N_TEXT)
    _, store, seen, sites = _recorded(pipe, PROMPTS, "uncond", negative_prompt=["a cat", "blurry dog"], **KWARGS)
    assert [s.text for s in store.samples] == ["a cat", "blurry dog"] and store.token_indices(1, "dog") == [[1]]
    _check_text_first_rope(pipe, store, sites, seen, N_TEXT)
    with pytest.raises(ProbeError, match="separate denoiser calls"):
        with attnprobe.probe(pipe, passes="all"):
            pipe(prompt=PROMPTS, **KWARGS)


@torch.no_grad()
def test_without_guidance_every_call_is_conditional(pipe):
    _, store, seen, sites = _recorded(pipe, PROMPTS, "all", guidance_scale=1.0, **KWARGS)
    assert [c.layout for c in store.calls] == [("cond", "cond")] * 2 and len(seen.text_len) == 2
    _check_text_first_rope(pipe, store, sites, seen, N_TEXT)


@torch.no_grad()
def test_prompt_rewriting_is_refused_before_it_generates(pipe):
    """``enable_prompt_rewrite`` (on by default) makes the text encoder write a new prompt: refused at the encoder's
    first call (one forward of its ``generate``), saying how to run; the probe leaves nothing installed."""
    forwards = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, a, k: forwards.append(1), with_kwargs=True)
    try:
        with pytest.raises(ProbeError, match=r"enable_prompt_rewrite=True.*Pass enable_prompt_rewrite=False"):
            with attnprobe.probe(pipe):
                pipe(prompt="a picture of dog", num_inference_steps=2, height=64, width=64, output_type="latent")
    finally:
        hook.remove()
    assert forwards == [1]
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {"LongCatImageAttnProcessor"}
    assert pipe.text_encoder._forward_pre_hooks == {} and pipe.transformer._forward_pre_hooks == {}


def test_bf16_images_bit_identical_with_the_probe():
    pipe = tiny_pipeline("longcat", dtype=torch.bfloat16)
    run = lambda: pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), **KWARGS).images  # noqa: E731
    plain = run()
    with attnprobe.probe(pipe) as store:
        probed = run()
    assert torch.equal(plain, probed) and len(store.calls) == 2


def test_packed_grid_counts_from_the_smallest_position_id():
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    ids = torch.stack([torch.ones(24), 512 + rows.flatten(), 512 + cols.flatten()], dim=-1)  # LongCat's image ids
    flux = torch.cat([torch.zeros(24, 1), ids[:, 1:] - 512], dim=-1)  # Flux's: (0, row, column)
    assert packed_grid(ids) == packed_grid(flux) == (8, 12)


def test_coverage_tests_the_pipeline_and_refuses_the_edit_pipeline():
    verdicts = {v.pipeline: v for v in pipeline_verdicts()}
    assert verdicts["LongCatImagePipeline"].verdict == "tested (tests/test_longcat.py)"
    assert verdicts["LongCatImagePipeline"].family == "longcat"
    assert verdicts["LongCatImageEditPipeline"].verdict.startswith("refused: reads the input image inside its text")
