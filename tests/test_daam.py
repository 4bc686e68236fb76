"""``heatmap(method="daam")`` against DAAM 0.2.0's aggregation written out here, from our own hooks.

The reference never touches attnprobe's maps: a forward pre-hook of ours on each site DAAM hooks (the ``attn2`` of the
up and down blocks, not the mid block; castorini/daam 0.2.0 ``daam/hook.py``) recomputes
``softmax(to_q(h) · to_k(e)ᵀ · scale)`` in float64 during the same run, keeps the second half of the batch × head rows
(the conditional image's heads, ``trace.py`` ``_unravel_attn``) of sites with 77 keys whose factor
``int(sqrt(latent_hw // q))`` is not 8 (``trace.py`` ``__call__``), and sums them over calls per (site, head)
(``heatmap.py`` ``RawHeatMapCollection.update``); then, per (site, head) in insertion order, every token's map bicubic
to ``sqrt(latent_hw)`` and clamped at 0, kept for factors in {0, 1, 2, 4, 8, 16, 32, 64}, the mean over entries
(``trace.py`` ``compute_global_heat_map``), the word as the mean of its tokens (``heatmap.py``
``compute_word_heat_map``, ``utils.py`` ``compute_token_merge_indices``: every occurrence, offset 1 for the start).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from attnprobe import ArgumentError, AttnprobeError, StoreError, heatmap, probe
from attnprobe.testing import tiny_sd3_pipeline, tiny_sd_pipeline

PROMPT = "a photo of a dog next to a small dog house"


class DaamReference:
    """DAAM 0.2.0's trace, our own code: hooks on the sites it hooks, its sum, its merge."""

    def __init__(self, pipe):
        unet = pipe.unet
        h = unet.config.sample_size * pipe.vae_scale_factor
        self.latent_hw = 4096 if h in (512, 1024) else 9216
        self.tokenizer = pipe.tokenizer
        blocks = [*unet.up_blocks, *unet.down_blocks]  # DAAM's layer order: up, then down; no mid block
        self.modules = [blk.attn2 for block in blocks if "CrossAttn" in type(block).__name__
                        for st in block.attentions for blk in st.transformer_blocks]
        self.sums: dict[tuple[int, int, int], torch.Tensor] = {}  # (factor, layer, head) -> [token, h, w], insertion order
        self.handles = []

    def __enter__(self):
        for layer, module in enumerate(self.modules):
            self.handles.append(module.register_forward_pre_hook(partial(self._hook, layer), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    @torch.no_grad()
    def _hook(self, layer, attn, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).double()
        context = kwargs["encoder_hidden_states"].double()
        b, n, _ = hidden.shape
        q = F.linear(hidden, attn.to_q.weight.double()).reshape(b, n, attn.heads, -1).transpose(1, 2)
        k = F.linear(context, attn.to_k.weight.double()).reshape(b, context.shape[1], attn.heads, -1).transpose(1, 2)
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).reshape(b * attn.heads, n, -1)  # [batch·head, q, key]
        factor = int(math.sqrt(self.latent_hw // n))
        if probs.shape[-1] != 77 or factor == 8:
            return
        side = int(math.sqrt(n))
        kept = probs[probs.shape[0] // 2:]  # the second half of the batch × head rows
        for head, m in enumerate(kept):
            key = (factor, layer, head)
            self.sums[key] = self.sums.get(key, 0.0) + m.T.reshape(-1, side, side)  # [token, h, w]

    def word_map(self, prompt: str, word: str) -> torch.Tensor:
        x = int(math.sqrt(self.latent_hw))
        merged = [F.interpolate(m.float().unsqueeze(1), size=(x, x), mode="bicubic").clamp_(min=0)
                  for (factor, _, _), m in self.sums.items() if factor in {0, 1, 2, 4, 8, 16, 32, 64}]
        maps = torch.stack(merged).mean(0)[:, 0]  # [token, x, x]
        tokens = [t.replace("</w>", "") for t in self.tokenizer.tokenize(prompt.lower())]
        search = [t.replace("</w>", "") for t in self.tokenizer.tokenize(word.lower())]
        idx = [s + i + 1 for s in range(len(tokens)) if tokens[s:s + len(search)] == search for i in range(len(search))]
        return maps[idx].mean(0)


def _run(pipe, prompt=PROMPT, size=192, steps=2, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, height=size, width=size, output_type="latent", generator=generator,
                **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def traced(pipe):
    """One run at 192 px (24×24 latents; the tiny UNet's native size is not 512 or 1024, so DAAM's 9216 path: it
    keeps the 24 and 6 grids, factors 4 and 16, skips the 12×12 one, factor 8, and the 3×3 is the mid block's, which
    it does not hook), recorded by a probe and by the reference at once."""
    with DaamReference(pipe) as ref, probe(pipe, dtype=torch.float32) as store:
        _run(pipe)
    return ref, store


@pytest.mark.parametrize("word", ["dog", "small", "house"])
def test_daam_map_equals_the_reference(traced, word):
    ref, store = traced
    expected = ref.word_map(PROMPT, word)
    got = heatmap(store, word, method="daam")
    assert got.shape == expected.shape == (96, 96) and got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())), (got - expected).abs().max()
    skipped = {k[0] for k in ref.sums}
    assert skipped == {4, 16}, skipped  # 24², 6² grids; 12² (factor 8) never recorded


def test_daam_differs_from_the_mean_method(traced):
    _, store = traced
    mean = heatmap(store, "dog", size=96)
    daam = heatmap(store, "dog", method="daam")
    assert not torch.allclose(mean, daam)  # sum over calls, per-head clamp, grids skipped, mid block left out
    assert torch.equal(heatmap(store, "dog", size=(96, 96)), mean)  # the default method unchanged


def test_daam_size_and_normalize_follow_expand_as(traced):
    _, store = traced
    word = heatmap(store, "dog", method="daam")
    big = heatmap(store, "dog", method="daam", size=192)
    assert torch.allclose(big, F.interpolate(word[None, None], size=(192, 192), mode="bicubic")[0, 0])
    norm = heatmap(store, "dog", method="daam", size=192, normalize=True)
    assert torch.allclose(norm, (big - big.min()) / (big.max() - big.min() + 1e-8))
    assert float(norm.min()) == 0 and abs(float(norm.max()) - 1) < 1e-5


def test_daam_on_a_512_unet_keeps_its_factors(pipe):
    """A UNet whose native size is 512 px takes DAAM's 4096 path: at 64 px (8×8 latents) the 8×8 grid is factor 8
    (skipped) and the 4×4 and 2×2 grids (16, 32) are kept, upsampled to 64×64 (the 1×1 grid is the mid block's)."""
    pipe.unet.register_to_config(sample_size=64)
    try:
        with DaamReference(pipe) as ref, probe(pipe, dtype=torch.float32) as store:
            _run(pipe, size=64, steps=3)
    finally:
        pipe.unet.register_to_config(sample_size=8)
    assert {k[0] for k in ref.sums} == {16, 32}
    got = heatmap(store, "dog", method="daam")
    expected = ref.word_map(PROMPT, "dog")
    assert got.shape == (64, 64)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_daam_from_an_aggregate_sum(pipe, traced):
    _, store = traced
    for aggregate in ("sum", "mean"):
        with probe(pipe, dtype=torch.float32, aggregate=aggregate) as agg:
            _run(pipe)
        assert torch.allclose(heatmap(agg, "dog", method="daam"), heatmap(store, "dog", method="daam"), rtol=1e-5,
                              atol=1e-7)


def test_daam_refuses_what_it_cannot_reproduce(pipe, traced):
    _, store = traced
    with probe(pipe, heads="mean", dtype=torch.float32) as mean_heads:
        _run(pipe, steps=1)
    with pytest.raises(StoreError, match="heads='mean'"):
        heatmap(mean_heads, "dog", method="daam")
    with probe(pipe, passes="all", dtype=torch.float32) as both:
        _run(pipe, steps=1)
    with pytest.raises(AttnprobeError, match="conditional samples are \\[1\\]"):
        heatmap(both, "dog", 0, method="daam")
    assert heatmap(both, "dog", 1, method="daam").shape == (96, 96)
    with probe(pipe, dtype=torch.float32) as unguided:
        _run(pipe, steps=1, guidance_scale=1.0)
    with pytest.raises(StoreError, match="uncond, cond"):
        heatmap(unguided, "dog", method="daam")
    with probe(pipe, dtype=torch.float32) as two_images:
        _run(pipe, steps=1, num_images_per_prompt=2)
    with pytest.raises(StoreError, match="uncond, cond"):
        heatmap(two_images, "dog", method="daam")
    with probe(pipe, sites="up_blocks.*", dtype=torch.float32) as partial_store:
        _run(pipe, steps=1)
    with pytest.raises(StoreError, match="lacks 6"):
        heatmap(partial_store, "dog", method="daam")
    assert heatmap(partial_store, "dog", method="daam", sites="up_blocks.*").shape == (96, 96)
    with pytest.raises(ArgumentError, match="not sites DAAM"):
        heatmap(store, "dog", method="daam", sites="mid_block.*")
    with probe(pipe, dtype=torch.float32) as small:
        _run(pipe, size=64, steps=1)  # 9216 path at 64 px: factors 12, 24, 48, 96, none DAAM keeps
    with pytest.raises(StoreError, match="No heat maps found"):
        heatmap(small, "dog", method="daam")
    with pytest.raises(ArgumentError, match="method="):
        heatmap(store, "dog", method="DAAM")


def test_daam_refuses_a_transformer():
    pipe = tiny_sd3_pipeline()
    with probe(pipe, dtype=torch.float32) as store:
        pipe("a dog", num_inference_steps=1, height=64, width=64, max_sequence_length=8, output_type="latent")
    with pytest.raises(StoreError, match="UNet2DConditionModel"):
        heatmap(store, "dog", method="daam")


def test_daam_is_one_pipeline_call(pipe, traced):
    _, store = traced
    with DaamReference(pipe) as ref, probe(pipe, dtype=torch.float32) as two:
        _run(pipe, steps=1)
        ref.sums.clear()  # DAAM clears its maps at each pipeline call (check_inputs)
        _run(pipe)
    assert [c.generation for c in two.calls] == [0, 1, 1]
    with pytest.raises(StoreError, match=r"generation 0: 1 calls, generation 1: 2 calls"):
        heatmap(two, "dog", method="daam")
    second = heatmap(two, "dog", method="daam", generation=1)
    expected = ref.word_map(PROMPT, "dog")
    assert torch.allclose(second, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert torch.allclose(second, heatmap(store, "dog", method="daam"), rtol=1e-6, atol=1e-8)
    assert heatmap(two, "dog", method="daam", generation=0).shape == (96, 96)
