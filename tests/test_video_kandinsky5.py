"""Kandinsky 5 text-to-video (``Kandinsky5T2VPipeline``): each visual block's ``cross_attention`` attends from the
video's patch tokens (channel-last latents) to Qwen2.5-VL keys cut from a chat template; the tiny pipeline
(``attnprobe.testing.tiny_pipeline("kandinsky5")``), CPU.

The float64 reference never touches attnprobe: our own pre-forward hooks keep each ``cross_attention``'s inputs; q and
k are recomputed from a float64 copy of the module (``to_query``/``to_key``, the per-head RMS norms) and the softmax
over the text keys is taken in float64 (no mask: the padding of a shorter prompt is attended).
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from attnprobe.analysis import decoded_frame_index
from attnprobe.capture.families import checked_family
from attnprobe.errors import AttnprobeError, ProbeError
from attnprobe.testing import tiny_pipeline
from test_families import recorded_under_inputs  # a probed generation under our own input hooks

# flex attention on CPU (the refused backend) warns that it runs unfused
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PROMPTS = ["a dog running on grass", "a red dog"]
#: 9 frames → 3 latent frames (temporal compression 4); 32 × 48 px → 4 × 6 latents → 2 × 3 patches of 2 × 2
VIDEO = dict(num_frames=9, height=32, width=48, num_inference_steps=2, max_sequence_length=32,
             negative_prompt="blurry", output_type="pt")
GRID = (3, 2, 3)
#: the keys: "<|im_start|>", "▁user" (left of the template by the tiny cut), the longer prompt's 5 words, "<|im_end|>"
N_TEXT = 8


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("kandinsky5")


def generate(pipe, prompt=PROMPTS, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **{**VIDEO, **kwargs}).frames


def recorded(pipe, prompt=PROMPTS, options=None, **kwargs):
    """``test_families.recorded_under_inputs`` with one probe: ``(plain, frames, store, inputs)``."""
    plain, frames, (store,), seen = recorded_under_inputs(pipe, generate, prompt, (options or {},), **kwargs)
    return plain, frames, store, seen


@torch.no_grad()
def reference(attn, inputs):
    """The softmax over the text keys of each video query: float64 ``[batch, head, video, text]``."""
    a = copy.deepcopy(attn).double()
    h, e = inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double()
    heads = lambda x: x.unflatten(-1, (a.num_heads, -1))  # noqa: E731
    q, k = a.query_norm(heads(a.to_query(h))), a.key_norm(heads(a.to_key(e)))
    return (torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5).softmax(-1)


@pytest.fixture(scope="module")
def probed(pipe):
    """Two prompts of different lengths (the batch padded to the longer), the prompt's calls."""
    return recorded(pipe)


def test_video_unchanged_and_maps_match_reference(probed, pipe):
    plain, frames, store, seen = probed
    assert torch.equal(plain, frames)  # the decoded video, bit for bit
    assert store.meta["family"] == "kandinsky5" and len(store.calls) == 2
    assert [(s.name, s.kind, s.heads) for s in store.sites] == [
        ("visual_transformer_blocks.0.cross_attention", "cross", 2),
        ("visual_transformer_blocks.1.cross_attention", "cross", 2)]
    assert all(v["verdict"] == "equal" for v in store.meta["processor_check"].values())
    for site in store.sites:
        maps = store[site.name]
        assert tuple(maps.shape) == (2, 2, 2, *GRID, N_TEXT)  # [call, sample, head, qt, qh, qw, token]
        for c, call in enumerate(store.calls):
            inputs = seen[site.name][call.index]
            ref = reference(pipe.transformer.get_submodule(site.name), inputs)
            got = maps[c].flatten(2, 4).double()  # [sample, head, qt·qh·qw in (t, h, w) order, token]
            torch.testing.assert_close(got, ref[[s.row for s in store.samples]], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-6, rtol=0)
        assert float(maps.min()) > 0  # no mask: every key, the padding too, gets attention


def test_rows_and_token_labels(probed):
    _, _, store, _ = probed
    assert [(s.pass_label, s.prompt_index, s.row) for s in store.samples] == [("cond", 0, 0), ("cond", 1, 1)]
    assert store.tokens(0) == ["<|im_start|>", "user", "a", "dog", "running", "on", "grass", "<|im_end|>"]
    assert store.token_kinds(0) == ["template"] * 2 + ["word"] * 5 + ["template"]
    assert store.tokens(1)[:6] == ["<|im_start|>", "user", "a", "red", "dog", "<|im_end|>"]
    assert store.token_kinds(1) == ["template"] * 2 + ["word"] * 3 + ["template"] + ["pad"] * 2
    assert store.token_indices(0, "dog") == [[3]] and store.token_indices(1, "dog") == [[4]]
    dog = attnprobe.trajectory(store, "dog", sample=1)  # [call]
    assert dog.shape == (2,) and float(dog.min()) > 0


def test_the_unconditional_calls(pipe):
    """``passes="uncond"``: the separate calls of the negative prompt (its own length), labelled from its ids."""
    _, _, store, seen = recorded(pipe, PROMPTS[0], options={"passes": "uncond", "heads": "mean"})
    assert [s.pass_label for s in store.samples] == ["uncond"]
    assert store.tokens(0) == ["<|im_start|>", "user", "blurry", "<|im_end|>"]
    site = store.sites[0].name
    inputs = seen[site][store.calls[0].index]
    assert inputs["encoder_hidden_states"].shape[1] == 4
    ref = reference(pipe.transformer.get_submodule(site), inputs).mean(1)
    torch.testing.assert_close(store[site][0, :, 0].flatten(1, 3).double(), ref, atol=2e-6, rtol=1e-5)


def test_frame_record_follows_the_vae(pipe, probed):
    """HunyuanVideo's causal VAE (temporal compression 4): the first latent frame decodes to one frame, each later one
    to 4. Checked on the VAE itself: k latent frames decode to (k − 1) · 4 + 1 frames (its group norms mix the
    frames, so which frame shows which latent frame is not checked by perturbation)."""
    _, frames, store, _ = probed
    assert store.grid_dims == ("qt", "qh", "qw")
    assert store.meta["image_size"] == [32, 48] and store.meta["latent_size"] == [4, 6]
    assert store.video == {"qt": 3, "latent_frames": 3, "patch": [1, 2, 2], "temporal_compression": 4,
                           "first_frame_alone": True, "frames": 9}
    assert frames.shape[1] == 9
    assert decoded_frame_index(store, 9) == [0] + [1] * 4 + [2] * 4
    with torch.no_grad():
        for k in (1, 2, 3):
            z = torch.randn(1, 4, k, 4, 6, generator=torch.Generator().manual_seed(1))
            assert pipe.vae.decode(z).sample.shape[2] == (k - 1) * 4 + 1
    assert attnprobe.heatmap(store, "dog", frame="all", sample=0).shape == (3, 32, 48)


def test_sparse_nabla_and_unreadable_backends_are_refused(pipe):
    from diffusers import Kandinsky5Transformer3DModel

    nabla = Kandinsky5Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=16, time_dim=16, model_dim=16, ff_dim=32,
        num_text_blocks=1, num_visual_blocks=1, axes_dims=(2, 2, 4), attention_type="nabla")
    with pytest.raises(AttnprobeError, match="NABLA.*attention_type='regular' is recorded"):
        with attnprobe.probe(nabla):
            pass
    # a call with sparse_params (the video tokens reordered in 8 × 8 blocks): refused before the denoiser runs
    seen = []
    handle = pipe.transformer.visual_transformer_blocks[0].cross_attention.register_forward_pre_hook(
        lambda *a: seen.append(1))
    try:
        with pytest.raises(ProbeError, match="sparse_params.*not one \\(t, h, w\\) grid"):
            with attnprobe.probe(pipe.transformer):
                pipe.transformer(torch.randn(1, 1, 4, 4, 4), encoder_hidden_states=torch.randn(1, 4, 16),
                                 timestep=torch.tensor([500.0]), pooled_projections=torch.randn(1, 16),
                                 visual_rope_pos=[torch.arange(1), torch.arange(2), torch.arange(2)],
                                 text_rope_pos=torch.arange(4), sparse_params={"to_fractal": True})
    finally:
        handle.remove()
    assert seen == []
    pipe.transformer.set_attention_backend("flex")  # flex attention: no scaled_dot_product_attention call to read
    try:
        with pytest.raises(ProbeError, match="scaled_dot_product_attention 0 times.*native"):
            with attnprobe.probe(pipe, heads="mean"):
                generate(pipe, PROMPTS[0], num_inference_steps=1, output_type="latent")
    finally:
        pipe.transformer.set_attention_backend("native")


def test_its_other_pipelines_are_refused_by_name(pipe):
    from diffusers import Kandinsky5I2IPipeline, Kandinsky5I2VPipeline, Kandinsky5T2IPipeline

    parts = {k: v for k, v in pipe.components.items()}
    for cls, why in ((Kandinsky5I2IPipeline, "image tokens"), (Kandinsky5I2VPipeline, "only in Kandinsky5T2VPipeline"),
                     (Kandinsky5T2IPipeline, "only in Kandinsky5T2VPipeline")):
        with pytest.raises(AttnprobeError, match=why):
            with attnprobe.probe(cls(**parts)):
                pass


def test_family_and_restore(pipe):
    family = checked_family(pipe, pipe.transformer)
    assert family.name == "kandinsky5" and family.video is not None and family.channels_last
    processors = [pipe.transformer.get_submodule(s.name).processor for s in attnprobe.list_sites(pipe)]
    with attnprobe.probe(pipe, heads="mean", tokens="dog"):
        generate(pipe, PROMPTS[0], output_type="latent")
    assert [pipe.transformer.get_submodule(s.name).processor for s in attnprobe.list_sites(pipe)] == processors


def test_a_kandinsky5_study_runs(tmp_path):
    result = attnprobe.study(model="tiny-kandinsky5", out=tmp_path / "s", concepts=["dog"], seeds=[0], steps=2,
                             variants=["baseline"], scorer="none", progress=False, echo=False)
    assert result.videos["tiny-kandinsky5"]["frames"] == 9 and result.videos["tiny-kandinsky5"]["latent_frames"] == 3
    assert (tmp_path / "s" / "frames.png").exists()
    assert all(0 < float(r["auc_last"]) < 1 for r in result.aucs)


class _Processor:
    """A stand-in for the Qwen2-VL processor the real pipeline has as its ``tokenizer``: text goes to its
    ``tokenizer`` (the real one also needs torchvision for its image processor)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text=None, images=None, videos=None, **kwargs):
        return self.tokenizer(text, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def test_a_processor_as_tokenizer_is_read_through_its_tokenizer(pipe):
    tokenizer = pipe.tokenizer
    pipe.__dict__["tokenizer"] = _Processor(tokenizer)  # past register_modules, which wants a known class
    try:
        with attnprobe.probe(pipe, heads="mean") as store:
            generate(pipe, PROMPTS[1], num_inference_steps=1, output_type="latent")
    finally:
        pipe.__dict__["tokenizer"] = tokenizer
    assert store.tokens(0) == ["<|im_start|>", "user", "a", "red", "dog", "<|im_end|>"]
    assert store.token_indices(0, "dog") == [[4]]


def test_several_videos_per_prompt_are_refused_with_what_to_pass(pipe):
    """Kandinsky5T2VPipeline hands its denoiser one text row for num_videos_per_prompt videos: which text each video
    row read cannot be labelled, so the call is refused, saying to repeat the prompt."""
    with pytest.raises(ProbeError, match="1 text row\\(s\\) for 2 video rows.*num_videos_per_prompt=1"):
        with attnprobe.probe(pipe, heads="mean"):
            pipe(prompt="a red dog", num_videos_per_prompt=2, num_frames=9, height=32, width=48, num_inference_steps=1,
                 max_sequence_length=32, output_type="latent")
