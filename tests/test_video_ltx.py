"""LTX-Video text-to-video (``LTXPipeline``, ``LTXVideoTransformer3DModel``): packed latents ``[batch, frame·h·w,
channel]`` whose grid the call's ``num_frames``, ``height`` and ``width`` give, ``attn2`` cross-attention to T5 with a
padding bias. Tiny pipeline (``attnprobe.testing.tiny_pipeline("ltx")``), CPU.

The float64 reference never touches attnprobe: our own pre-forward hooks keep each ``attn2``'s inputs (the video
tokens, the caption-projected T5 states and the bias the denoiser made of T5's mask); q and k are recomputed from a
float64 copy of the module's projections and RMS norms (across heads, before the head split), and the softmax is taken
in float64. Where each token sits in the video comes from the pipeline's own ``_pack_latents`` of an index video.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from attnprobe.analysis import decoded_frame_index
from attnprobe.capture.families import family_of
from attnprobe.errors import ProbeError
from attnprobe.models.coverage import pipeline_verdicts
from attnprobe.testing import tiny_pipeline
from test_families import Inputs  # our own pre-forward hooks: each attention module's call arguments, per call

PROMPT = "a dog running on grass"
#: 17 frames → 3 latent frames (temporal compression 8); 64 × 96 px → a 2 × 3 latent (spatial 32), patches of 1
VIDEO = dict(num_frames=17, height=64, width=96, num_inference_steps=2, max_sequence_length=16, output_type="pt")
GRID = (3, 2, 3)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("ltx")


def generate(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **{**VIDEO, **kwargs}).frames


@torch.no_grad()
def reference(attn, inputs):
    """``attn2``'s probabilities, float64 ``[batch, head, token of the packed video, text key]``."""
    a = copy.deepcopy(attn).double()
    h, e = inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double()
    q = a.norm_q(a.to_q(h)).unflatten(-1, (a.heads, -1)).transpose(1, 2)  # RMS norm over all heads' channels
    k = a.norm_k(a.to_k(e)).unflatten(-1, (a.heads, -1)).transpose(1, 2)
    bias = inputs["attention_mask"].double()[:, None]  # [batch, 1, 1, key]: (1 − mask) · −10000
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, dim=-1)


def token_of(pipe, grid):
    """``[qt, qh, qw]``: the packed token of each latent position, by the pipeline's own packing of an index video."""
    index = torch.arange(grid[0] * grid[1] * grid[2], dtype=torch.float64).reshape(1, 1, *grid)
    packed = pipe._pack_latents(index, pipe.transformer.config.patch_size, pipe.transformer.config.patch_size_t)
    where = torch.empty(packed.shape[1], dtype=torch.long)
    where[packed[0, :, 0].long()] = torch.arange(packed.shape[1])
    return where.reshape(grid)


@pytest.fixture(scope="module")
def probed(pipe):
    """The frames without and with the probe (every pass, fp32 maps), the store, and our own inputs of every site."""
    plain = generate(pipe)
    sites = [s.name for s in attnprobe.list_sites(pipe)]
    with Inputs(pipe.transformer, sites) as seen, attnprobe.probe(pipe, passes="all", dtype=torch.float32) as store:
        frames = generate(pipe)
    return plain, frames, store, seen.seen


def test_frames_unchanged_and_maps_match_reference(pipe, probed):
    plain, frames, store, seen = probed
    assert torch.equal(plain, frames)  # the decoded video, bit for bit
    assert store.meta["family"] == "ltx" and len(store.calls) == 2
    assert [s.name for s in store.sites] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert all(v["verdict"] == "equal" for v in store.meta["processor_check"].values())
    where = token_of(pipe, GRID)  # [qt, qh, qw] -> packed token
    for site in store.sites:
        maps = store[site.name]
        assert tuple(maps.shape) == (2, 2, 2, *GRID, 16)  # [call, sample, head, qt, qh, qw, token]
        attn = pipe.transformer.get_submodule(site.name)
        for c, call in enumerate(store.calls):
            ref = reference(attn, seen[site.name][call.index])
            for sample in store.samples:
                got = maps[c, sample.index].double()  # [head, qt, qh, qw, token]
                want = ref[sample.row][:, where]  # each latent position's own token
                torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
                torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-6, rtol=0)


def test_rows_tokens_and_padding(probed):
    _, _, store, _ = probed
    uncond, cond = store.samples
    assert (uncond.pass_label, uncond.row, cond.pass_label, cond.row) == ("uncond", 0, "cond", 1)
    assert store.meta["row_evidence"] == "encode_prompt"
    assert store.tokens(cond.index)[:6] == ["a", "dog", "running", "on", "grass", "</s>"]
    assert store.tokens(uncond.index)[0] == "</s>"  # the empty negative prompt
    assert store.token_indices(cond.index, "dog") == [[1]]  # one occurrence, at position 1
    site = store.sites[0].name
    mask = torch.tensor(store.meta["text_mask"], dtype=torch.bool)  # [sample, token], 1 = attended
    assert mask[cond.index].sum() == 6 and mask[uncond.index].sum() == 1
    maps = store[site]
    for sample in store.samples:  # T5's padding gets probability 0 (exp of −10000), the rest all of it
        assert torch.all(maps[:, sample.index][..., ~mask[sample.index]] == 0)
    assert float(maps[:, uncond.index, ..., 0].min()) == 1.0  # "</s>" alone: all of every query's attention
    dog = attnprobe.trajectory(store, "dog", cond.index, by_frame=True)  # [call, qt]: mean over sites, heads, qh, qw
    every = torch.stack([store[s.name][:, cond.index, ..., 1] for s in store.sites])  # [site, call, head, qt, qh, qw]
    torch.testing.assert_close(dog, every.double().mean(dim=(0, 2, 4, 5)).to(dog.dtype), atol=1e-6, rtol=0)


def test_frame_record_and_sizes(probed):
    _, frames, store, _ = probed
    assert store.grid_dims == ("qt", "qh", "qw")
    assert store.video == {"qt": 3, "latent_frames": 3, "patch": [1, 1, 1], "temporal_compression": 8,
                           "first_frame_alone": True, "frames": 17}
    assert frames.shape[1] == store.video["frames"]
    assert store.meta["latent_size"] == [2, 3] and store.meta["image_size"] == [64, 96]
    assert attnprobe.heatmap(store, "dog", store.samples[1].index, frame="all").shape == (3, 64, 96)
    assert decoded_frame_index(store, 17) == [0] + [1] * 8 + [2] * 8


def test_even_latent_frames_keep_the_first_alone(pipe):
    """LTX's VAE decodes the first latent frame alone for any count (9 frames → 2 latent frames → 9 frames); its
    num_latent_frames_batch_size is for tiled decoding, not CogVideoX's pairs."""
    with attnprobe.probe(pipe, heads="mean", tokens="dog") as store:
        frames = generate(pipe, num_frames=9)
    assert store.video["latent_frames"] == 2 and store.video["first_frame_alone"] is True
    assert frames.shape[1] == store.video["frames"] == 9
    assert tuple(store[store.sites[0].name].shape) == (2, 1, 1, 2, 2, 3, 1)


def test_streamed_store_round_trips(pipe, tmp_path):
    with attnprobe.probe(pipe, heads="mean", tokens="dog", stream_to=tmp_path / "s") as store:
        generate(pipe)
    loaded = attnprobe.AttentionStore.load(tmp_path / "s")
    site = store.sites[0].name
    assert loaded.video == store.video and torch.equal(loaded[site], store[site])
    assert tuple(loaded[site].shape) == (2, 1, 1, *GRID, 1)


def _call(pipe, **changes):
    """One direct call of the tiny transformer as LTXPipeline makes it (2 × 3 × 2 tokens), with ``changes``."""
    t = pipe.transformer
    kwargs = dict(hidden_states=torch.randn(1, 12, t.config.in_channels), encoder_hidden_states=torch.randn(1, 16, 32),
                  timestep=torch.tensor([500.0]), encoder_attention_mask=torch.ones(1, 16), num_frames=2, height=2,
                  width=3, rope_interpolation_scale=(0.32, 32, 32))
    kwargs.update(changes)
    return t(**{k: v for k, v in kwargs.items() if v is not None})


@pytest.mark.parametrize("changes, match", [
    (dict(num_frames=None), "num_frames=None"),
    (dict(height=2.0), "height=2.0"),
    (dict(num_frames=3), r"\(1, 12, 8\).*3·2·3"),
    (dict(video_coords=torch.zeros(1, 3, 12)), "video_coords"),
    (dict(timestep=torch.full((1, 12), 500.0)), "timestep per token"),
])
def test_calls_it_cannot_read_are_refused(pipe, changes, match):
    seen = []
    handle = pipe.transformer.transformer_blocks[0].attn2.register_forward_pre_hook(lambda *a: seen.append(1))
    try:
        with pytest.raises(ProbeError, match=match):
            with attnprobe.probe(pipe.transformer):
                _call(pipe, **changes)
    finally:
        handle.remove()
    assert seen == []  # refused in the denoiser's pre-hook: no block ran


def test_other_ltx_pipelines_and_ltx2_stay_refused():
    verdicts = {v.pipeline: v for v in pipeline_verdicts()}
    assert verdicts["LTXPipeline"].verdict == "tested (tests/test_video_ltx.py)"
    assert "timestep" in verdicts["LTXImageToVideoPipeline"].verdict
    for name in ("LTXConditionPipeline", "LTXI2VLongMultiPromptPipeline"):
        assert verdicts[name].verdict.startswith("refused: places every token by video_coords")
    from diffusers import LTX2VideoTransformer3DModel

    ltx2 = torch.nn.Module.__new__(LTX2VideoTransformer3DModel)
    assert family_of(ltx2).name == "ltx2" and "audio" in family_of(ltx2).refused
    assert verdicts["LTX2Pipeline"].verdict.startswith("refused: LTX-2")


def test_the_study_counts_ltx_frames_by_its_compression(pipe):
    """LTX-Video's pipelines name the compression vae_temporal_compression_ratio (8): 3 latent frames are 17 frames."""
    from attnprobe.study import video as vid

    assert vid.temporal_compression(pipe) == 8 and vid.check_frames(pipe, None, "tiny-ltx") == 17
    with pytest.raises(attnprobe.errors.ConfigError, match="use 9 or 17"):
        vid.check_frames(pipe, 12, "tiny-ltx")


def test_patches_come_from_the_denoiser_config():
    """A transformer with patch_size 2 and patch_size_t 2 called directly (LTXPipeline packs with patches of 1 only):
    the grid is still the call's num_frames × height × width tokens, the latent video that times the patches."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    t = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=2, patch_size_t=2, num_attention_heads=2,
                                   attention_head_dim=12, cross_attention_dim=24, num_layers=1,
                                   caption_channels=32).eval()
    kwargs = dict(hidden_states=torch.randn(1, 12, 8), encoder_hidden_states=torch.randn(1, 16, 32),
                  timestep=torch.tensor([500.0]), encoder_attention_mask=(torch.arange(16) < 5)[None].long(),
                  num_frames=2, height=2, width=3, rope_interpolation_scale=(0.32, 32, 32))
    with torch.no_grad():
        plain = t(**kwargs).sample
        with Inputs(t, ["transformer_blocks.0.attn2"]) as seen, attnprobe.probe(t, dtype=torch.float32) as store:
            probed = t(**kwargs).sample
    assert torch.equal(plain, probed)
    assert store.video == {"qt": 2, "latent_frames": 4, "patch": [2, 2, 2], "temporal_compression": None,
                           "first_frame_alone": True, "frames": None}
    assert store.meta["latent_size"] == [4, 6]
    ref = reference(t.transformer_blocks[0].attn2, seen.seen["transformer_blocks.0.attn2"][0])[0]
    got = store["transformer_blocks.0.attn2"][0, 0].double()  # [head, qt, qh, qw, token]
    torch.testing.assert_close(got.flatten(1, 3), ref, atol=2e-6, rtol=1e-5)  # tokens in (t, h, w) order, as its RoPE
    assert torch.all(got[..., 5:] == 0)


def test_several_prompts_label_their_rows(pipe):
    """[uncond × 2, cond × 2] for two prompts; each prompt's "dog" where its tokenizer put it."""
    with attnprobe.probe(pipe, passes="all", heads="mean") as store:
        generate(pipe, prompt=["a dog", "a red dog"])
    assert [(x.pass_label, x.row, x.prompt_index) for x in store.samples] == [
        ("uncond", 0, 0), ("uncond", 1, 1), ("cond", 2, 0), ("cond", 3, 1)]
    assert store.token_indices(2, "dog") == [[1]] and store.token_indices(3, "dog") == [[2]]
    assert store.tokens(3)[:4] == ["a", "red", "dog", "</s>"]
    assert tuple(store[store.sites[0].name].shape) == (2, 4, 1, *GRID, 16)
