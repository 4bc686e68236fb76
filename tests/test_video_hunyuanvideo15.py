"""HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Pipeline``): double-stream blocks over ``[video; text block]``, the
text block reordered per row by its masks to ``[attended image tokens; attended ByT5; attended Qwen; masked image
tokens; masked ByT5; masked Qwen]``; the tiny pipeline (``attnprobe.testing.tiny_pipeline("hunyuanvideo-1.5")``), CPU.

The float64 reference never touches attnprobe: our own pre-forward hooks keep each attention module's inputs (and the
denoiser's masks); q and k are recomputed from a float64 copy of the module (per-head RMS norms, the text block's own
projections), our own rotary embedding turns the video positions' consecutive channel pairs, the mask the module was
handed masks the keys, and the softmax over all keys is taken in float64. Where each ByT5 and Qwen key sits in the
block is worked out here from the denoiser's masks, as its forward orders them.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import attnprobe
from attnprobe.analysis import decoded_frame_index
from attnprobe.capture.families import checked_family, family_of
from attnprobe.capture.families.hunyuanvideo15 import FAMILY
from attnprobe.errors import ProbeError
from attnprobe.models.coverage import pipeline_verdicts
from attnprobe.testing import tiny_pipeline
from test_families import recorded_under_inputs  # a probed generation under our own input hooks
from test_video import first_changed_frames

PROMPTS = ['a dog "HI" on grass', "a red cat"]
#: 9 frames → 3 latent frames (temporal compression 4); 32 × 48 px → 4 × 6 latents, patch 1
VIDEO = dict(num_frames=9, height=32, width=48, num_inference_steps=2)
GRID = (3, 4, 6)
N_GLYPH, N_QWEN, N_IMAGE = 16, 24, 8
N_TEXT = N_GLYPH + N_QWEN


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("hunyuanvideo-1.5")


def generate(pipe, prompt=PROMPTS, **kwargs):
    # diffusers 0.42's HunyuanVideo 1.5 VAE decodes one video per call: several prompts stay latents
    out = "latent" if isinstance(prompt, list) and len(prompt) > 1 else "pt"
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **{"output_type": out, **VIDEO,
                                                                            **kwargs}).frames


def recorded(pipe, prompt=PROMPTS, options=None, **kwargs):
    """``test_families.recorded_under_inputs`` with one probe, and our own hook on the denoiser around the probed
    generation: ``(plain, frames, store, site inputs, denoiser inputs)``."""
    calls = []  # the denoiser's masks and image_embeds, per call

    @contextlib.contextmanager
    def denoiser_inputs():
        hook = pipe.transformer.register_forward_pre_hook(
            lambda m, a, k: calls.append({n: k[n].clone() for n in ("encoder_attention_mask", "encoder_attention_mask_2",
                                                                     "image_embeds")}), with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()

    plain, frames, (store,), seen = recorded_under_inputs(pipe, generate, prompt, (options or {},), denoiser_inputs,
                                                          **kwargs)
    return plain, frames, store, seen, calls


def _rotate(x, cos, sin):
    """Consecutive channel pairs of ``x`` ``[batch, position, head, d]`` turned by the model's real tables
    ``[position, d]``, float64."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos.double()[None, :, None] + turned * sin.double()[None, :, None]


@torch.no_grad()
def reference(attn, inputs):
    """The video-query × text-block-key slice of the softmax over all ``[video; text block]`` keys, the block's masked
    keys at ``-inf``: float64 ``[batch, head, video, block]``."""
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


def block_positions(call, row):
    """Where the denoiser's forward puts row ``row``'s keys in its text block, worked out from its masks as its code
    reads: ``[image[att]; byt5[att]; qwen[att]; image[~att]; byt5[~att]; qwen[~att]]``; returned in the token axis's
    order ``[byt5[att]; qwen[att]; byt5[~att]; qwen[~att]]`` (and whether each is attended)."""
    qwen = call["encoder_attention_mask"][row].bool().tolist()
    glyph = call["encoder_attention_mask_2"][row].bool().tolist()
    image = [not bool(torch.all(call["image_embeds"] == 0))] * call["image_embeds"].shape[1]
    keys = [("i", i, m) for i, m in enumerate(image)] + [("g", i, m) for i, m in enumerate(glyph)] + [
        ("q", i, m) for i, m in enumerate(qwen)]
    block = [k for k in keys if k[2]] + [k for k in keys if not k[2]]
    axis = [k for k in block if k[0] != "i"]
    return [block.index(k) for k in axis], [k[2] for k in axis]


@pytest.fixture(scope="module")
def probed(pipe):
    """Two prompts (one quoting text, so its ByT5 keys are attended), separate guidance calls: the prompts' rows."""
    return recorded(pipe)


def test_video_unchanged_and_maps_match_reference(probed, pipe):
    plain, frames, store, seen, calls = probed
    assert torch.equal(plain, frames)  # the latents, bit for bit
    assert store.meta["family"] == "hunyuanvideo15" and len(store.calls) == 2
    assert [(s.name, s.kind) for s in store.sites] == [("transformer_blocks.0.attn", "joint"),
                                                        ("transformer_blocks.1.attn", "joint")]
    assert all(v["verdict"] == "equal" for v in store.meta["processor_check"].values())
    assert [(s.pass_label, s.row) for s in store.samples] == [("cond", 0), ("cond", 1)]
    for site in store.sites:
        maps = store[site.name]
        assert tuple(maps.shape) == (2, 2, 2, *GRID, N_TEXT)  # [call, sample, head, qt, qh, qw, token]
        for c, call in enumerate(store.calls):
            inputs = seen[site.name][call.index]
            assert inputs["encoder_hidden_states"].shape[1] == N_IMAGE + N_TEXT  # the image tokens are in the block
            ref = reference(pipe.transformer.get_submodule(site.name), inputs)
            got = maps[c].flatten(2, 4).double()  # [sample, head, qt·qh·qw in (t, h, w) order, token]
            for s in store.samples:
                where, attended = block_positions(calls[call.index], s.row)
                torch.testing.assert_close(got[s.index], ref[s.row][..., where], atol=2e-6, rtol=1e-5)
                attended = torch.tensor(attended)
                assert float(got[s.index][..., ~attended].abs().max()) == 0  # masked keys: exactly 0
                assert float(got[s.index][..., attended].min()) > 0
        share = maps.sum(-1).mean(dim=(-3, -2, -1))  # [call, sample, head]: the text share of every video position
        torch.testing.assert_close(share, store.text_share(site), atol=1e-6, rtol=0)
        assert 0 < float(share.min()) and float(share.max()) < 1


def test_rows_tokens_and_glyphs(probed):
    """Each row's token axis in its own order: the quoted text's ByT5 positions first ("unknown": 'Text "HI". ' and
    ``</s>``, 12 bytes), then the Qwen positions past the chat template's head, then the masked ByT5, then padding."""
    _, _, store, _, calls = probed
    first, second = store.tokens(0), store.tokens(1)
    assert store.layout(0).kinds[:12] == ["unknown"] * 12 and first[12:23] == [
        "a", "dog", '"', "H", "I", '"', "on", "grass", "<|im_end|>", "<|im_start|>", "assistant"]
    assert store.layout(0).kinds[23:] == ["pad"] * 17
    assert second[:6] == ["a", "red", "cat", "<|im_end|>", "<|im_start|>", "assistant"]
    assert store.layout(1).kinds[6:] == ["pad"] * 34  # no quoted text: all 16 ByT5 keys masked, then Qwen's padding
    assert store.token_indices(0, "dog") == [[13]] and store.token_indices(1, "cat") == [[2]]
    assert calls[0]["encoder_attention_mask_2"].sum(1).tolist() == [12, 0]  # the ByT5 mask agrees
    assert calls[0]["encoder_attention_mask"].sum(1).tolist() == [11, 6]
    dog = attnprobe.trajectory(store, "dog", sample=0)  # [call]
    assert dog.shape == (2,) and float(dog.min()) > 0


def test_renorm_and_the_negative_pass(pipe):
    """``renorm`` rows sum to 1 with the masked keys still 0; ``passes="uncond"`` keeps the separate negative calls."""
    _, _, store, seen, calls = recorded(pipe, PROMPTS[1], options={"joint": "renorm", "heads": "mean"})
    maps = store[store.sites[1].name]  # [call, sample, 1, qt, qh, qw, token]
    assert tuple(maps.shape) == (2, 1, 1, *GRID, N_TEXT)
    torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-6, rtol=0)
    assert float(maps[..., 6:].abs().max()) == 0
    inputs = seen[store.sites[1].name][store.calls[0].index]
    where, _ = block_positions(calls[store.calls[0].index], 0)
    ref = reference(pipe.transformer.get_submodule(store.sites[1].name), inputs)[0][..., where]
    ref = (ref / ref.sum(-1, keepdim=True)).mean(0)  # renormalised over the text, then the head mean
    torch.testing.assert_close(maps[0, 0, 0].flatten(0, 2).double(), ref, atol=2e-6, rtol=1e-5)
    with attnprobe.probe(pipe, passes="uncond", heads="mean") as negative:
        generate(pipe, PROMPTS[1])
    assert [s.pass_label for s in negative.samples] == ["uncond"] and len(negative.calls) == 2
    assert negative.tokens(0)[:4] == ["<|im_end|>", "<|im_start|>", "assistant", ""]  # the empty prompt, as " "


def test_frame_record_follows_the_vae(pipe):
    """HunyuanVideo 1.5's causal VAE decodes the first latent frame alone, each later one to 4 frames: 3 → 9. Checked
    on the VAE itself: a change to latent frame j first shows at the decoded frame the record maps to j."""
    with attnprobe.probe(pipe, heads="mean", tokens="dog") as store:
        frames = generate(pipe, PROMPTS[0])
    assert store.grid_dims == ("qt", "qh", "qw") and store.meta["latent_size"] == [4, 6]
    assert store.video == {"qt": 3, "latent_frames": 3, "patch": [1, 1, 1], "temporal_compression": 4,
                           "first_frame_alone": True, "frames": 9}
    assert frames.shape[1] == 9
    index = decoded_frame_index(store, 9)
    assert index == [0] + [1] * 4 + [2] * 4
    z = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    assert first_changed_frames(pipe.vae, z) == [index.index(j) for j in range(3)]  # causal: earlier frames stay
    assert attnprobe.heatmap(store, "dog", frame="all").shape == (3, 32, 48)


def test_refusals(pipe):
    """Several videos per prompt (image_embeds made per prompt, masks repeated in another order) and the
    image-to-video pipeline are refused; the family is recorded, no longer refused."""
    assert family_of(pipe.transformer) is FAMILY and checked_family(pipe, pipe.transformer) is FAMILY
    with pytest.raises(ProbeError, match="num_videos_per_prompt=1"):
        with attnprobe.probe(pipe):
            generate(pipe, PROMPTS, num_videos_per_prompt=2, num_inference_steps=1)
    verdicts = {v.pipeline: v.verdict for v in pipeline_verdicts()}
    assert verdicts["HunyuanVideo15ImageToVideoPipeline"].startswith("refused: puts the input image's SigLIP tokens")
    assert verdicts["HunyuanVideo15Pipeline"].startswith("tested")


def test_hunyuanimage_negative_pass_counts_its_glyph_keys():
    """The separate negative calls of HunyuanImage 2.1 (same [ByT5; Qwen] keys) are labelled over all their keys,
    ByT5's included: one label per position of the token axis."""
    image = tiny_pipeline("hunyuanimage")
    with attnprobe.probe(image, passes="uncond", heads="mean") as store:
        image(prompt="a red cat", height=32, width=32, num_inference_steps=1, output_type="latent")
    assert len(store.tokens(0)) == store[store.sites[0].name].shape[-1] == 48  # 16 ByT5 + 32 Qwen
    assert store.tokens(0)[:2] == ["<|im_end|>", ""]  # the empty prompt's template end, then its masked ByT5 keys
