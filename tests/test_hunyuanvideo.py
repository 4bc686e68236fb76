"""HunyuanVideo text-to-video (``HunyuanVideoPipeline``): double- and single-stream blocks over ``[video; text]``
with each row's text padding masked out, read with a frame axis; a tiny pipeline (``attnprobe.testing.tiny_pipeline``),
CPU. Its image-to-video and Framepack denoisers are refused.

The float64 reference never touches attnprobe: our own pre-forward hooks keep each attention module's inputs; q and
k are recomputed from a float64 copy of the module (per-head RMS norms, the text's own projections in the
double-stream block), our own rotary embedding turns the video positions' consecutive channel pairs, the mask the
module was handed is applied, and the softmax over all keys is taken in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from attnprobe.capture.families import checked_family, family_of
from attnprobe.errors import ProbeError
from attnprobe.models.coverage import pipeline_verdicts
from attnprobe.models.tiny_video import TINY_HUNYUANVIDEO_TEMPLATE
from attnprobe.testing import tiny_pipeline
from test_families import recorded_under_inputs  # a probed generation under our own input hooks

PROMPTS = ["a dog running on grass", "a cat"]
#: 9 frames → 3 latent frames (temporal compression 4); 32 × 48 px → 4 × 6 latents → 2 × 3 patches of 2 × 2
VIDEO = dict(num_frames=9, height=32, width=48, num_inference_steps=2, max_sequence_length=16, output_type="pt",
             prompt_template=TINY_HUNYUANVIDEO_TEMPLATE)
GRID = (3, 2, 3)
N_VIDEO, N_TEXT = 18, 16


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("hunyuanvideo")


def generate(pipe, prompt=PROMPTS, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **{**VIDEO, **kwargs}).frames


def recorded(pipe, prompt=PROMPTS, probes=({},), **kwargs):
    """``test_families.recorded_under_inputs``: ``(plain, frames, stores, inputs)``."""
    return recorded_under_inputs(pipe, generate, prompt, probes, **kwargs)


def _rotate(x, cos, sin):
    """Consecutive channel pairs of ``x`` ``[batch, position, head, d]`` turned by the model's real tables
    ``[position, d]`` (each angle repeated for the pair), float64."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos.double()[None, :, None] + turned * sin.double()[None, :, None]


@torch.no_grad()
def reference(attn, kind, inputs):
    """The video-query × text-key block of the softmax over all ``[video; text]`` keys, float64 ``[batch, head,
    video, text]``."""
    a = copy.deepcopy(attn).double()
    h, e = inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double()
    heads = lambda x: x.unflatten(-1, (a.heads, -1))  # noqa: E731
    n = h.shape[1]
    if kind == "joint":  # the text through projections of its own
        q = torch.cat([a.norm_q(heads(a.to_q(h))), a.norm_added_q(heads(a.add_q_proj(e)))], dim=1)
        k = torch.cat([a.norm_k(heads(a.to_k(h))), a.norm_added_k(heads(a.add_k_proj(e)))], dim=1)
    else:
        x = torch.cat([h, e], dim=1)
        q, k = a.norm_q(heads(a.to_q(x))), a.norm_k(heads(a.to_k(x)))
    cos, sin = inputs["image_rotary_emb"]
    q = torch.cat([_rotate(q[:, :n], cos, sin), q[:, n:]], dim=1)
    k = torch.cat([_rotate(k[:, :n], cos, sin), k[:, n:]], dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    logits = logits.masked_fill(~inputs["attention_mask"].bool(), float("-inf"))
    return logits.softmax(-1)[:, :, :n, n:]


@pytest.fixture(scope="module")
def probed(pipe):
    """Two prompts of different lengths (each row its own text mask), embedded guidance: one call per step."""
    plain, frames, (store,), seen = recorded(pipe)
    return plain, frames, store, seen


def test_frames_unchanged_and_maps_match_reference(probed, pipe):
    plain, frames, store, seen = probed
    assert torch.equal(plain, frames)  # the decoded video, bit for bit
    assert store.meta["family"] == "hunyuanvideo" and len(store.calls) == 2
    assert [(s.name, s.kind) for s in store.sites] == [("transformer_blocks.0.attn", "joint"), (
        "single_transformer_blocks.0.attn", "single"), ("single_transformer_blocks.1.attn", "single")]
    assert all(v["verdict"] == "equal" for v in store.meta["processor_check"].values())
    for site in store.sites:
        maps = store[site.name]
        assert tuple(maps.shape) == (2, 2, 2, *GRID, N_TEXT)  # [call, sample, head, qt, qh, qw, token]
        for c, call in enumerate(store.calls):
            ref = reference(pipe.transformer.get_submodule(site.name), site.kind, seen[site.name][call.index])
            got = maps[c].flatten(2, 4).double()  # [sample, head, qt·qh·qw in (t, h, w) order, token]
            torch.testing.assert_close(got, ref[[s.row for s in store.samples]], atol=2e-6, rtol=1e-5)
        share = maps.sum(-1).mean(dim=(-3, -2, -1))  # [call, sample, head]: the text share of every video position
        torch.testing.assert_close(share, store.text_share(site), atol=1e-6, rtol=0)
        assert 0 < float(share.min()) and float(share.max()) < 1


def test_padded_text_keys_get_nothing_and_labels_follow_the_template(probed):
    """Each row's keys past its prompt's template (the padding, masked by the transformer) get exactly 0; the keys are
    the prompt's words, then the template's closing <|eot_id|> (its pieces in the tiny tokenizer), then padding."""
    _, _, store, _ = probed
    assert [s.pass_label for s in store.samples] == ["cond", "cond"] and [s.row for s in store.samples] == [0, 1]
    assert store.tokens(0)[:5] == ["a", "dog", "running", "on", "grass"]
    assert store.tokens(1)[:2] == ["a", "cat"]
    assert store.token_indices(0, "dog") == [[1]] and store.token_indices(1, "cat") == [[1]]
    for sample in store.samples:
        kinds = store.token_kinds(sample.index)
        words = len(PROMPTS[sample.index].split())
        assert kinds[:words] == ["word"] * words and set(kinds[words:]) <= {"template", "pad"}
        pad = torch.tensor([k == "pad" for k in kinds])
        assert pad.any() and not pad[:words].any()
        for site in store.sites:
            got = store[site.name][:, sample.index]
            assert float(got[..., pad].abs().max()) == 0 and float(got[..., ~pad].min()) > 0


def test_grid_and_frame_record(probed):
    _, frames, store, _ = probed
    assert store.grid_dims == ("qt", "qh", "qw")
    assert store.video == {"qt": 3, "latent_frames": 3, "patch": [1, 2, 2], "temporal_compression": 4,
                           "first_frame_alone": True, "frames": 9}
    assert frames.shape[1] == store.video["frames"]
    assert store.meta["image_size"] == [32, 48] and store.meta["latent_size"] == [4, 6]
    assert attnprobe.trajectory(store, "dog", by_frame=True).shape == (2, 3)
    assert attnprobe.heatmap(store, "dog", frame="all").shape == (3, 32, 48)


def test_renorm_is_exact_over_its_text_share(probed, pipe):
    _, _, exact, _ = probed
    _, _, (renorm,), _ = recorded(pipe, probes=({"joint": "renorm"},))
    for site in exact.sites:
        e = exact[site.name].double()
        torch.testing.assert_close(renorm[site.name].double(), e / e.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(renorm[site.name].sum(-1), torch.ones(renorm[site.name].shape[:-1]), atol=1e-6,
                                   rtol=0)


def test_true_cfg_runs_the_negative_prompt_as_separate_calls(pipe):
    """true_cfg_scale > 1 with a negative prompt: the prompt's call, then the negative prompt's, each step (the
    embedded guidance goes to both); one probe per pass, one inside the other; each matches the reference."""
    kwargs = dict(true_cfg_scale=3.0, negative_prompt="blurry")
    plain, frames, (cond, uncond), seen = recorded(pipe, "a dog", ({"passes": "cond"}, {"passes": "uncond"}), **kwargs)
    assert torch.equal(plain, frames)
    assert [c.index for c in cond.calls] == [0, 2] and [c.index for c in uncond.calls] == [1, 3]
    assert [(s.pass_label, s.text) for s in cond.samples] == [("cond", "a dog")]
    assert [(s.pass_label, s.text) for s in uncond.samples] == [("uncond", "blurry")]
    assert uncond.tokens(0)[0] == "blurry" and uncond.token_kinds(0)[0] == "word"
    for store in (cond, uncond):
        for site in store.sites:
            for c, call in enumerate(store.calls):
                ref = reference(pipe.transformer.get_submodule(site.name), site.kind, seen[site.name][call.index])
                torch.testing.assert_close(store[site.name][c].flatten(2, 4).double(), ref, atol=2e-6, rtol=1e-5)
    with pytest.raises(ProbeError, match="passes='all'"):
        with attnprobe.probe(pipe, passes="all"):
            generate(pipe, "a dog", **kwargs)


def test_videos_per_prompt_label_each_row(pipe):
    """num_videos_per_prompt=2 with two prompts: rows [p0, p0, p1, p1] in both passes, each with its own text."""
    kwargs = dict(num_videos_per_prompt=2, true_cfg_scale=2.0, negative_prompt=["ugly", "blurry dark"],
                  num_inference_steps=1, num_frames=5, output_type="latent")
    with attnprobe.probe(pipe, heads="mean", passes="uncond") as uncond, attnprobe.probe(
            pipe, heads="mean", passes="cond") as cond:
        generate(pipe, ["a dog", "a red cat"], **kwargs)
    rows = [(s.prompt_index, s.image_index, s.row) for s in cond.samples]
    assert rows == [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)]
    assert [s.text for s in cond.samples] == ["a dog", "a dog", "a red cat", "a red cat"]
    assert [s.text for s in uncond.samples] == ["ugly", "ugly", "blurry dark", "blurry dark"]
    assert cond.tokens(2)[:3] == ["a", "red", "cat"] and uncond.tokens(3)[:2] == ["blurry", "dark"]
    assert [c.index for c in cond.calls] == [0] and [c.index for c in uncond.calls] == [1]


def test_another_template_is_not_labelled(pipe):
    """A prompt_template other than diffusers' default: the keys are recorded, labelled 'unknown', with a warning."""
    template = {"template": "<|im_start|>user\n{}<|im_end|>", "crop_start": 3}
    with pytest.warns(UserWarning, match="inside a template attnprobe knows"):
        with attnprobe.probe(pipe, heads="mean") as store:
            generate(pipe, "a dog", prompt_template=template)
    assert set(store.token_kinds(0)) == {"unknown"} and tuple(store[store.sites[0].name].shape[3:6]) == GRID


def test_temporal_patch_of_two(pipe):
    """patch_size_t=2: 5 frames → 2 latent frames → one query frame; the decoded count is left unsaid (``frames``
    None), as for every temporal patch."""
    from diffusers import HunyuanVideoTransformer3DModel

    other = copy.copy(pipe)  # the same components, its own transformer
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    other.transformer = HunyuanVideoTransformer3DModel(**{**config, "patch_size_t": 2}).eval()
    plain, frames, (store,), seen = recorded(other, "a dog", num_frames=5)
    assert torch.equal(plain, frames)
    assert store.video == {"qt": 1, "latent_frames": 2, "patch": [2, 2, 2], "temporal_compression": 4,
                           "first_frame_alone": True, "frames": None}
    site = store.sites[0]
    ref = reference(other.transformer.get_submodule(site.name), site.kind, seen[site.name][0])
    assert tuple(store[site.name].shape) == (2, 1, 2, 1, 2, 3, N_TEXT)
    torch.testing.assert_close(store[site.name][0].flatten(2, 4).double(), ref, atol=2e-6, rtol=1e-5)


def test_image_to_video_and_framepack_are_refused(pipe):
    from diffusers import HunyuanVideoImageToVideoPipeline, HunyuanVideoTransformer3DModel

    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    i2v = HunyuanVideoTransformer3DModel(**{**config, "in_channels": 9, "image_condition_type": "latent_concat"})
    assert family_of(i2v).name == "hunyuanvideo-image"
    with pytest.raises(ProbeError, match="input image's tokens"):
        attnprobe.probe(i2v).__enter__()
    i2v_pipe = HunyuanVideoImageToVideoPipeline.__new__(HunyuanVideoImageToVideoPipeline)  # its class decides
    with pytest.raises(ProbeError, match="HunyuanVideoImageToVideoPipeline.*image's tokens"):
        checked_family(i2v_pipe, pipe.transformer)
    verdicts = {v.pipeline: v for v in pipeline_verdicts()}
    assert verdicts["HunyuanVideoPipeline"].verdict == "tested (tests/test_hunyuanvideo.py)"
    assert verdicts["HunyuanVideoImageToVideoPipeline"].family == "hunyuanvideo-image"
    assert verdicts["HunyuanVideoFramepackPipeline"].verdict.startswith("refused: HunyuanVideo Framepack")
