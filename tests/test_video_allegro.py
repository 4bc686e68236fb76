"""Allegro (``AllegroPipeline``, ``AllegroTransformer3DModel``): each block's ``attn2`` cross-attends to T5 with the
pipeline's padding mask as a −10000 bias; the tiny pipeline (``attnprobe.testing.tiny_pipeline("allegro")``), CPU.

The float64 reference never touches attnprobe: our own pre-forward hooks keep each ``attn2``'s inputs and the
transformer's ``encoder_attention_mask`` (the pipeline's 0/1 T5 mask); q and k are ``to_q``/``to_k`` of a float64
copy of the module (Allegro's ``attn2`` has no norms and no rotary embedding), the bias ``(1 − mask) · −10000`` is
ours, and the softmax over the text keys is taken in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from attnprobe.analysis import decoded_frame_index, frame_heatmaps
from attnprobe.capture.families import checked_family
from attnprobe.errors import ArgumentError, ProbeError
from attnprobe.testing import tiny_pipeline
from test_families import Inputs  # our own pre-forward hooks: each attention module's call arguments, per call

PROMPT = "a dog running on grass"
#: 16 frames → 4 latent frames (temporal compression 4); 32 × 32 px → 4 × 4 latents → 2 × 2 patches of 2 × 2
VIDEO = dict(num_frames=16, height=32, width=32, num_inference_steps=2, max_sequence_length=16, clean_caption=False,
             output_type="pt")
GRID = (4, 2, 2)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("allegro")


def generate(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **{**VIDEO, **kwargs}).frames


class Masks:
    """Our own pre-forward hook on the transformer: its ``encoder_attention_mask`` of each call."""

    def __init__(self, denoiser):
        self.seen = []
        self.handle = denoiser.register_forward_pre_hook(
            lambda m, a, k: self.seen.append(k["encoder_attention_mask"].clone()), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.no_grad()
def reference(attn, inputs, mask):
    """``softmax(q·kᵀ/√d + (1 − mask)·−10000)`` in float64, ``[batch, head, video, text]``."""
    a = copy.deepcopy(attn).double()
    q = a.to_q(inputs["hidden_states"].double()).unflatten(-1, (a.heads, -1)).transpose(1, 2)
    k = a.to_k(inputs["encoder_hidden_states"].double()).unflatten(-1, (a.heads, -1)).transpose(1, 2)
    bias = (1 - mask.double())[:, None, None, :] * -10000.0
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, dim=-1)


def _probe(pipe, call=None, **options):
    """The video with the probe on (the pipeline given ``call``), the store, our own inputs of every site and the
    transformer's masks."""
    sites = [s.name for s in attnprobe.list_sites(pipe)]
    with Inputs(pipe.transformer, sites) as seen, Masks(pipe.transformer) as masks:
        with attnprobe.probe(pipe, dtype=torch.float32, **options) as store:
            frames = generate(pipe, **(call or {}))
    return frames, store, seen.seen, masks.seen


@pytest.fixture(scope="module")
def probed(pipe):
    plain = generate(pipe)
    return (plain, *_probe(pipe))


def test_video_unchanged_and_maps_match_reference(probed, pipe):
    plain, frames, store, seen, masks = probed
    assert torch.equal(plain, frames)  # the decoded video, bit for bit
    assert store.meta["family"] == "allegro" and len(store.calls) == 2 and len(store.samples) == 1
    assert [s.name for s in store.sites] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert all(v["verdict"] == "equal" for v in store.meta["processor_check"].values())
    sample = store.samples[0]
    assert sample.pass_label == "cond" and sample.row == 1  # [uncond, cond] in one call
    words = len(PROMPT.split()) + 1  # and </s>; the rest of the 16 positions are padding
    for site in store.sites:
        maps = store[site.name]
        assert tuple(maps.shape) == (2, 1, 2, *GRID, 16)  # [call, sample, head, qt, qh, qw, token]
        for c, call in enumerate(store.calls):
            attn = pipe.transformer.get_submodule(site.name)
            ref = reference(attn, seen[site.name][call.index], masks[call.index])[sample.row]
            got = maps[c, 0].flatten(1, 3).double()  # [head, qt·qh·qw in (t, h, w) order, token]
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-6, rtol=0)
            assert float(got[..., words:].abs().max()) == 0  # padded keys: exp(−10000) is 0 in fp32
            assert float(got[..., :words].min()) > 0


def test_tokens_grid_and_frame_record(probed):
    _, frames, store, _, masks = probed
    assert store.tokens(0)[:7] == ["a", "dog", "running", "on", "grass", "</s>", "<pad>"]
    assert store.token_indices(0, "dog") == [[1]]  # one occurrence, at position 1
    assert store.meta["text_mask"] == [masks[0][1].int().tolist()]
    assert store.grid_dims == ("qt", "qh", "qw")
    assert store.meta["image_size"] == [32, 32] and store.meta["latent_size"] == [4, 4]
    # Allegro's VAE decodes every latent frame to 4 frames, the first too
    assert store.video == {"qt": 4, "latent_frames": 4, "patch": [1, 2, 2], "temporal_compression": 4,
                           "first_frame_alone": False, "frames": 16}
    assert frames.shape[1] == store.video["frames"]
    assert decoded_frame_index(store, 16) == [f // 4 for f in range(16)]
    every = attnprobe.heatmap(store, "dog", frame="all")
    assert every.shape == (4, 32, 32)
    assert torch.equal(frame_heatmaps(store, "dog", 16, (32, 32))[5], every[1])
    per_frame = attnprobe.trajectory(store, "dog", by_frame=True)
    torch.testing.assert_close(per_frame.mean(-1), attnprobe.trajectory(store, "dog"), atol=1e-6, rtol=0)


def test_a_cut_video_is_refused_by_the_decoded_frame_functions(pipe):
    """13 frames asked: 4 latent frames, 16 decoded, the pipeline keeps the first 13; the store says 16."""
    with attnprobe.probe(pipe, heads="mean", tokens="dog") as store:
        frames = generate(pipe, num_frames=13)
    assert frames.shape[1] == 13 and store.video["latent_frames"] == 4 and store.video["frames"] == 16
    with pytest.raises(ArgumentError, match="decode to 16 frames.*keeps only the first frames"):
        decoded_frame_index(store, 13)


def test_passes_and_rows_of_a_batch(pipe):
    """Two prompts and a negative prompt, every pass: [uncond × 2, cond × 2], each row against the reference and
    labelled with its own text (the tiny VAE decodes one video per call: latents here)."""
    prompts = ["a dog", "a red dog"]
    call = dict(prompt=prompts, negative_prompt="blurry", output_type="latent")
    _, store, seen, masks = _probe(pipe, passes="all", call=call)
    assert [(s.pass_label, s.prompt_index, s.row) for s in store.samples] == [
        ("uncond", 0, 0), ("uncond", 1, 1), ("cond", 0, 2), ("cond", 1, 3)]
    assert store.meta["row_evidence"] == "encode_prompt"
    assert store.tokens(0)[:2] == ["blurry", "</s>"] and store.tokens(3)[:4] == ["a", "red", "dog", "</s>"]
    assert store.token_indices(2, "dog") == [[1]] and store.token_indices(3, "dog") == [[2]]
    site = store.sites[1].name
    ref = reference(pipe.transformer.get_submodule(site), seen[site][1], masks[1])  # call 1, every row
    torch.testing.assert_close(store[site][1].flatten(2, 4).double(), ref, atol=2e-6, rtol=1e-5)


def test_probe_twice_stays_exact_and_restores(pipe, probed):
    """A second probe on the same pipeline records the same maps; after it, the processors are the model's."""
    _, _, first, _, _ = probed
    with attnprobe.probe(pipe, dtype=torch.float32) as again:
        generate(pipe)
    for site in first.sites:
        assert torch.equal(first[site.name], again[site.name])
    processors = [m.processor for n, m in pipe.transformer.named_modules() if n.endswith(("attn1", "attn2"))]
    assert len(processors) == 4 and all(type(p).__name__ == "AllegroAttnProcessor2_0" for p in processors)


def test_a_temporal_patch_is_refused(pipe):
    """patch_size_t ≠ 1: the patch embedding still cuts every frame while the output is unpatchified in groups."""
    odd = copy.copy(pipe)
    odd.transformer = copy.copy(pipe.transformer)
    odd.transformer.register_to_config(patch_size_t=2)
    with pytest.raises(ProbeError, match="patch_size_t=2"):
        checked_family(odd, odd.transformer)
