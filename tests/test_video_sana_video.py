"""Sana-Video (``SanaVideoPipeline``, ``SanaVideoTransformer3DModel``): each block's ``attn2`` cross-attends to Gemma 2
read after Sana's complex human instruction, with RMS norms across heads and the padding mask as a −10000 bias; the
tiny pipeline (``attnprobe.testing.tiny_pipeline("sana-video")``), CPU.

The float64 reference never touches attnprobe: our own pre-forward hooks keep each ``attn2``'s inputs and the
transformer's ``encoder_attention_mask`` (the pipeline's 0/1 mask); q and k are ``norm_q(to_q(·))`` and
``norm_k(to_k(·))`` of a float64 copy of the module (norms over all heads' channels, then the head split), the bias
``(1 − mask) · −10000`` is ours, and the softmax over the text keys is taken in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from attnprobe.analysis import decoded_frame_index
from attnprobe.testing import tiny_pipeline
from test_families import Inputs  # our own pre-forward hooks: each attention module's call arguments, per call
from test_video_allegro import Masks  # our own pre-forward hook: the transformer's encoder_attention_mask per call

PROMPT = "a dog running on grass"
#: 9 frames → 3 latent frames (Wan's VAE: temporal compression 4); 32 × 64 px → 4 × 8 latents → 2 × 4 patches
VIDEO = dict(frames=9, height=32, width=64, num_inference_steps=2, max_sequence_length=16,
             use_resolution_binning=False, output_type="pt")
GRID = (3, 2, 4)


def generate(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **{**VIDEO, **kwargs}).frames


@torch.no_grad()
def reference(attn, inputs, mask):
    """``softmax(q·kᵀ/√d + (1 − mask)·−10000)`` in float64, ``[batch, head, video, text]``."""
    a = copy.deepcopy(attn).double()
    q = a.norm_q(a.to_q(inputs["hidden_states"].double())).unflatten(-1, (a.heads, -1)).transpose(1, 2)
    k = a.norm_k(a.to_k(inputs["encoder_hidden_states"].double())).unflatten(-1, (a.heads, -1)).transpose(1, 2)
    bias = (1 - mask.double())[:, None, None, :] * -10000.0
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, dim=-1)


@pytest.fixture(scope="module")
def probed():
    pipe = tiny_pipeline("sana-video")
    plain = generate(pipe)
    sites = [s.name for s in attnprobe.list_sites(pipe)]
    with Inputs(pipe.transformer, sites) as seen, Masks(pipe.transformer) as masks:
        with attnprobe.probe(pipe, dtype=torch.float32, passes="all") as store:
            frames = generate(pipe)
    return pipe, plain, frames, store, seen.seen, masks.seen


def test_video_unchanged_and_maps_match_reference(probed):
    pipe, plain, frames, store, seen, masks = probed
    assert torch.equal(plain, frames)  # the decoded video, bit for bit
    assert store.meta["family"] == "sana-video" and len(store.calls) == 2
    assert [s.name for s in store.sites] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert all(v["verdict"] == "equal" for v in store.meta["processor_check"].values())
    # [uncond, cond] in one call, the negative prompt ("") read without the instruction
    assert [(s.pass_label, s.row) for s in store.samples] == [("uncond", 0), ("cond", 1)]
    assert store.meta["row_evidence"] == "encode_prompt"
    for site in store.sites:
        maps = store[site.name]
        assert tuple(maps.shape) == (2, 2, 2, *GRID, 16)  # [call, sample, head, qt, qh, qw, token]
        for c, call in enumerate(store.calls):
            ref = reference(pipe.transformer.get_submodule(site.name), seen[site.name][call.index], masks[call.index])
            got = maps[c].flatten(2, 4).double()  # [sample, head, qt·qh·qw in (t, h, w) order, token]
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-6, rtol=0)
            padded = (masks[call.index] == 0)[:, None, None, :].expand_as(got)
            assert float(got[padded].abs().max()) == 0  # padded keys: exp(−10000) is 0 in fp32


def test_tokens_in_the_template_and_frame_record(probed):
    _, _, frames, store, _, masks = probed
    cond = store.samples[1].index
    tokens = store.tokens(cond)
    assert tokens[0] == "<bos>" and tokens[2:7] == ["a", "dog", "running", "on", "grass"]
    assert store.token_indices(cond, "dog") == [[3]]
    assert store.meta["text_mask"][1] == masks[0][1].int().tolist()
    assert store.video == {"qt": 3, "latent_frames": 3, "patch": [1, 2, 2], "temporal_compression": 4,
                           "first_frame_alone": True, "frames": 9}
    assert frames.shape[1] == store.video["frames"]
    assert decoded_frame_index(store, 9) == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert attnprobe.heatmap(store, "dog", frame="all", sample=cond).shape == (3, 32, 64)


def test_image_to_video_is_refused_by_name():
    from attnprobe.models.coverage import pipeline_verdicts

    verdicts = {v.pipeline: v for v in pipeline_verdicts()}
    assert verdicts["SanaVideoPipeline"].verdict == "tested (tests/test_video_sana_video.py)"
    assert verdicts["SanaImageToVideoPipeline"].verdict.startswith("refused: gives its input image's latent frame")
