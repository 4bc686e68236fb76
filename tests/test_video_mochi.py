"""Mochi 1 text-to-video (``MochiPipeline``): each block's ``attn1`` is joint attention over ``[video; text]`` whose
processor calls the kernel once per batch row over that row's attended text; the tiny pipeline
(``attnprobe.testing.tiny_pipeline("mochi")``), CPU.

The float64 reference never touches attnprobe: our own pre-forward hooks keep each ``attn1``'s inputs; q and k are
recomputed from a float64 copy of the module (``to_q``/``to_k`` and the text's ``add_q_proj``/``add_k_proj``, the
per-head RMS norms), our own rotary embedding turns the video positions' (even, odd) channel pairs by the model's
tables, the row's masked text keys get ``-inf``, and the softmax over all ``[video; text]`` keys is taken in float64
over the whole padded text (so a padded key's probability is exactly ``exp(-inf) = 0``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from attnprobe.analysis import decoded_frame_index
from attnprobe.capture.families import checked_family
from attnprobe.errors import ProbeError
from attnprobe.testing import tiny_pipeline
from test_families import recorded_under_inputs  # a probed generation under our own input hooks
from test_video import first_changed_frames

# diffusers' MochiRoPE asks for CPU autocast to fp32, which torch refuses with a warning
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")

PROMPTS = ["a dog running on grass", "a red dog"]
#: 13 frames → 3 latent frames (the pipeline's temporal factor 6); 32 × 48 px → 4 × 6 latents → 2 × 3 patches of 2 × 2
VIDEO = dict(num_frames=13, height=32, width=48, num_inference_steps=2, max_sequence_length=16, output_type="pt")
GRID = (3, 2, 3)
N_VIDEO, N_TEXT = 18, 16


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("mochi")


def generate(pipe, prompt=PROMPTS, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **{**VIDEO, **kwargs}).frames


def recorded(pipe, prompt=PROMPTS, options=None, **kwargs):
    """``test_families.recorded_under_inputs`` with one probe: ``(plain, frames, store, inputs)``."""
    plain, frames, (store,), seen = recorded_under_inputs(pipe, generate, prompt, (options or {},), **kwargs)
    return plain, frames, store, seen


def _rotate(x, cos, sin):
    """Mochi's rotary embedding by hand: the (even, odd) channel pairs of ``x`` ``[batch, position, head, d]`` turned
    by the model's tables ``[position, head, d / 2]``, float64."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.double()[None], sin.double()[None]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


@torch.no_grad()
def reference(attn, inputs):
    """The video-query × text-key block of each row's softmax over ``[video; text]`` keys, the text keys its mask
    leaves out at ``-inf``: float64 ``[batch, head, video, text]``."""
    a = copy.deepcopy(attn).double()
    h, e = inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double()
    heads = lambda x: x.unflatten(-1, (a.heads, -1))  # noqa: E731
    cos, sin = inputs["image_rotary_emb"]
    q = torch.cat([_rotate(a.norm_q(heads(a.to_q(h))), cos, sin), a.norm_added_q(heads(a.add_q_proj(e)))], dim=1)
    k = torch.cat([_rotate(a.norm_k(heads(a.to_k(h))), cos, sin), a.norm_added_k(heads(a.add_k_proj(e)))], dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    n = h.shape[1]
    keep = torch.cat([torch.ones(h.shape[0], n, dtype=torch.bool), inputs["attention_mask"].bool()], dim=1)
    return logits.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)[:, :, :n, n:]


@pytest.fixture(scope="module")
def probed(pipe):
    """Two prompts of different lengths and the empty negative prompt, every pass: ``[uncond × 2, cond × 2]``, each
    row with its own text mask."""
    return recorded(pipe, options={"passes": "all"})


def test_video_unchanged_and_maps_match_reference(probed, pipe):
    plain, frames, store, seen = probed
    assert torch.equal(plain, frames)  # the decoded video, bit for bit
    assert store.meta["family"] == "mochi" and len(store.calls) == 2
    assert [(s.name, s.kind) for s in store.sites] == [("transformer_blocks.0.attn1", "joint"),
                                                        ("transformer_blocks.1.attn1", "joint")]
    assert all(v["verdict"] == "equal" for v in store.meta["processor_check"].values())
    for site in store.sites:
        maps = store[site.name]
        assert tuple(maps.shape) == (2, 4, 2, *GRID, N_TEXT)  # [call, sample, head, qt, qh, qw, token]
        for c, call in enumerate(store.calls):
            inputs = seen[site.name][call.index]
            ref = reference(pipe.transformer.get_submodule(site.name), inputs)
            got = maps[c].flatten(2, 4).double()  # [sample, head, qt·qh·qw in (t, h, w) order, token]
            torch.testing.assert_close(got, ref[[s.row for s in store.samples]], atol=2e-6, rtol=1e-5)
            mask = inputs["attention_mask"].bool()[[s.row for s in store.samples]]  # [sample, token]
            assert float(got.masked_select(~mask[:, None, None, :]).abs().max()) == 0  # padded keys: exactly 0
            assert float(got.masked_select(mask[:, None, None, :]).min()) > 0
        share = maps.sum(-1).mean(dim=(-3, -2, -1))  # [call, sample, head]: the text share of every video position
        torch.testing.assert_close(share, store.text_share(site), atol=1e-6, rtol=0)
        assert 0 < float(share.min()) and float(share.max()) < 1


def test_rows_tokens_and_masks(probed):
    _, _, store, seen = probed
    assert [(s.pass_label, s.prompt_index, s.row) for s in store.samples] == [
        ("uncond", 0, 0), ("uncond", 1, 1), ("cond", 0, 2), ("cond", 1, 3)]
    assert store.meta["row_evidence"] == "encode_prompt"
    assert store.tokens(0)[:2] == ["</s>", "<pad>"]  # the empty negative prompt: its end token alone
    assert store.tokens(2)[:7] == ["a", "dog", "running", "on", "grass", "</s>", "<pad>"]
    assert store.tokens(3)[:5] == ["a", "red", "dog", "</s>", "<pad>"]
    assert store.token_indices(2, "dog") == [[1]] and store.token_indices(3, "dog") == [[2]]
    # each row's own mask: the words and </s> attended, the padding not
    assert [sum(m) for m in store.meta["text_mask"]] == [1, 1, 6, 4]
    mask = seen[store.sites[0].name][0]["attention_mask"]
    assert store.meta["text_mask"] == mask.int().tolist()
    dog = attnprobe.trajectory(store, "dog", sample=3)  # [call]
    assert dog.shape == (2,) and float(dog.min()) > 0


def test_renorm_rows_sum_to_one_and_padding_stays_zero(pipe):
    _, _, store, seen = recorded(pipe, options={"joint": "renorm", "heads": "mean"})
    maps = store[store.sites[1].name]  # [call, sample, 1, qt, qh, qw, token]: the prompts' rows
    assert tuple(maps.shape) == (2, 2, 1, *GRID, N_TEXT)
    torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-6, rtol=0)
    assert float(maps[:, 0, ..., 6:].abs().max()) == 0 and float(maps[:, 1, ..., 4:].abs().max()) == 0
    inputs = seen[store.sites[1].name][0]
    ref = reference(pipe.transformer.get_submodule(store.sites[1].name), inputs)[2:]
    ref = (ref / ref.sum(-1, keepdim=True)).mean(1)  # renormalised over the text, then the head mean
    torch.testing.assert_close(maps[0, :, 0].flatten(1, 3).double(), ref, atol=2e-6, rtol=1e-5)


def test_frame_record_follows_the_vae(pipe, probed):
    """Mochi's VAE decodes every latent frame to 6 frames and drops the first 5: the first latent frame makes one
    frame. Checked on the VAE itself: a change to latent frame j first shows at the decoded frame the record maps to j."""
    _, frames, store, _ = probed
    assert store.grid_dims == ("qt", "qh", "qw")
    assert store.meta["image_size"] == [32, 48] and store.meta["latent_size"] == [4, 6]
    assert store.video == {"qt": 3, "latent_frames": 3, "patch": [1, 2, 2], "temporal_compression": 6,
                           "first_frame_alone": True, "frames": 13}
    assert frames.shape[1] == 13
    index = decoded_frame_index(store, 13)
    assert index == [0] + [1] * 6 + [2] * 6
    z = torch.randn(1, 12, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    assert first_changed_frames(pipe.vae, z) == [index.index(j) for j in range(3)]  # causal: earlier frames stay
    heat = attnprobe.heatmap(store, "dog", frame="all", sample=2)
    assert heat.shape == (3, 32, 48)


def test_frame_record_without_dropping_frames(pipe):
    """``drop_last_temporal_frames = False``: every latent frame makes 6 frames (3 → 18)."""
    pipe.vae.drop_last_temporal_frames = False
    try:
        with attnprobe.probe(pipe, heads="mean", tokens="dog") as store:
            frames = generate(pipe, PROMPTS[0])
    finally:
        pipe.vae.drop_last_temporal_frames = True
    assert frames.shape[1] == 18
    assert store.video["first_frame_alone"] is False and store.video["frames"] == 18
    assert decoded_frame_index(store, 18) == [f // 6 for f in range(18)]


def test_an_empty_prompt_zeroed_has_no_text(pipe):
    """``force_zeros_for_empty_prompt``: the empty negative prompt's row attends to no text (mask all 0): its exact
    maps are 0, and renorm, which has nothing to renormalise over, is refused."""
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    try:
        _, _, store, _ = recorded(pipe, PROMPTS[0], options={"passes": "all", "heads": "mean"})
        with pytest.raises(ProbeError, match="attends to no text position.*joint='exact'"):
            with attnprobe.probe(pipe, passes="all", joint="renorm"):
                generate(pipe, PROMPTS[0])
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=False)
    maps = store[store.sites[0].name]
    assert store.samples[0].pass_label == "uncond" and store.meta["text_mask"][0] == [0] * N_TEXT
    assert float(maps[:, 0].abs().max()) == 0 and float(maps[:, 1].sum(-1).min()) > 0
    assert float(store.text_share(store.sites[0])[:, 0].abs().max()) == 0


def test_a_call_without_its_mask_is_refused(pipe):
    """The denoiser called without ``encoder_attention_mask`` by keyword: which text each row attends to is unknown."""
    latents = torch.randn(1, 12, 1, 4, 4)
    states = torch.randn(1, N_TEXT, 32)
    seen = []
    handle = pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(lambda *a: seen.append(1))
    try:
        with pytest.raises(ProbeError, match=r"encoder_attention_mask none.*by keyword, \[batch, text\] = \[1, 16\]"):
            with attnprobe.probe(pipe.transformer):
                pipe.transformer(latents, encoder_hidden_states=states, timestep=torch.tensor([500.0]),
                                 encoder_attention_mask=None)
    finally:
        handle.remove()
    assert seen == []  # refused before the denoiser ran


def test_family_and_restore(pipe):
    family = checked_family(pipe, pipe.transformer)
    assert family.name == "mochi" and family.video is not None and family.row_calls
    processors = [pipe.transformer.get_submodule(s.name).processor for s in attnprobe.list_sites(pipe)]
    with attnprobe.probe(pipe, heads="mean", tokens="dog"):
        generate(pipe, PROMPTS[0], output_type="latent")
    assert [pipe.transformer.get_submodule(s.name).processor for s in attnprobe.list_sites(pipe)] == processors


def test_a_mochi_study_runs(tmp_path):
    result = attnprobe.study(model="tiny-mochi", out=tmp_path / "s", concepts=["dog"], seeds=[0], steps=2,
                             variants=["baseline"], scorer="none", progress=False, echo=False)
    assert result.videos["tiny-mochi"]["frames"] == 13 and result.videos["tiny-mochi"]["latent_frames"] == 3
    assert (tmp_path / "s" / "frames.png").exists()
    assert all(0 < float(r["auc_last"]) < 1 for r in result.aucs)


def test_a_mask_with_a_hole_puts_each_key_back_at_its_position(pipe):
    """``prompt_embeds`` with a mask that leaves out a word inside the prompt (not only the padding at its end): the
    processor attends to the kept positions in order, and each map's keys are back at their own positions."""
    embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS[0], max_sequence_length=N_TEXT,
                                                               device=torch.device("cpu"))
    mask = mask.clone()
    mask[0, 2] = False  # "running"
    call = dict(prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                negative_prompt_attention_mask=negative_mask)
    _, _, store, seen = recorded(pipe, **call)
    site = store.sites[0].name
    got = store[site][0, 0].flatten(1, 3).double()  # [head, video, token]: the prompt's row
    inputs = seen[site][store.calls[0].index]
    torch.testing.assert_close(got, reference(pipe.transformer.get_submodule(site), inputs)[1], atol=2e-6, rtol=1e-5)
    assert float(got[..., 2].abs().max()) == 0 and float(got[..., 3].min()) > 0
