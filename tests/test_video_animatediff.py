"""AnimateDiff text-to-video (``AnimateDiffPipeline``, ``UNetMotionModel``) on the tiny pipeline
(``tiny_pipeline("animatediff")``: the tiny SD 1.5 UNet with a seeded ``MotionAdapter``).

The float64 reference never touches attnprobe: our own pre-forward hooks keep each ``attn2``'s inputs (``[batch ·
frame, query, channel]`` image states and ``[batch · frame, token, hidden]`` text states), q and k are recomputed from
float64 copies of its ``to_q`` / ``to_k``, and site row ``b · frames + f`` is read as latent row ``b``'s frame ``f``:
diffusers' ``UNetMotionModel.forward`` folds ``sample.permute(0, 2, 1, 3, 4).reshape(batch · frames, ...)`` and
``AnimateDiffPipeline`` repeats ``prompt_embeds.repeat_interleave(num_frames)`` (batch slowest, frame fastest).
"""

from __future__ import annotations

import math

import pytest
import torch

import attnprobe
from attnprobe.capture.batch_frames import frame_rows, latent_states
from attnprobe.errors import AttnprobeError, ProbeError
from attnprobe.testing import tiny_pipeline

PROMPTS = ["a dog running", "a red cat"]
FRAMES = 3
VIDEO = dict(num_frames=FRAMES, height=64, width=128, num_inference_steps=2, output_type="pt")  # latents 8 × 16


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("animatediff")


def generate(pipe, **kwargs):
    return pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), **{**VIDEO, **kwargs}).frames


class Inputs:
    """Our own pre-forward hooks on each ``attn2`` site: per UNet call, each site's ``(hidden_states,
    encoder_hidden_states)``."""

    def __init__(self, unet, names):
        self.unet, self.names, self.calls, self.hooks = unet, names, [], []

    def __enter__(self):
        modules = dict(self.unet.named_modules())
        self.hooks.append(self.unet.register_forward_pre_hook(lambda *a: self.calls.append({})))
        for name in self.names:
            self.hooks.append(modules[name].register_forward_pre_hook(self._keep(name), with_kwargs=True))
        return self

    def _keep(self, name):
        def keep(module, args, kwargs):
            self.calls[-1].setdefault(name, (args[0].detach().clone(), kwargs["encoder_hidden_states"].detach().clone()))

        return keep

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def reference(attn, hidden, text, frames, latent_hw):
    """float64 ``[batch, head, frame, qh, qw, token]`` of one site call from its inputs, site row ``b · frames + f``
    read as latent row ``b``'s frame ``f``."""
    def project(linear, x):
        w = linear.weight.double()
        return x.double() @ w.T + (linear.bias.double() if linear.bias is not None else 0)

    q, k = project(attn.to_q, hidden), project(attn.to_k, text)  # [row, query, (head d)], [row, token, (head d)]
    heads = attn.heads
    q = q.unflatten(-1, (heads, -1)).transpose(1, 2)
    k = k.unflatten(-1, (heads, -1)).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)).softmax(-1)  # [row, head, query, token]
    h, w = latent_hw
    scale = math.isqrt(h * w // probs.shape[2])
    probs = probs.unflatten(0, (-1, frames))  # [batch, frame, head, query, token]
    return probs.transpose(1, 2).unflatten(3, (h // scale, w // scale))


@pytest.fixture(scope="module")
def probed(pipe):
    plain = generate(pipe)
    before = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    sites = [s.name for s in attnprobe.list_sites(pipe)]
    with Inputs(pipe.unet, sites) as seen, attnprobe.probe(pipe, passes="all", dtype=torch.float32) as every, \
            attnprobe.probe(pipe, dtype=torch.float32, heads="mean") as cond, \
            attnprobe.probe(pipe, passes="uncond", dtype=torch.float32) as uncond:
        frames = generate(pipe)
    after = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    return plain, frames, {"all": every, "cond": cond, "uncond": uncond}, seen.calls, before, after


def test_frames_bit_identical_and_processors_restored(probed):
    plain, frames, _, _, before, after = probed
    assert torch.equal(plain, frames)
    assert before == after


def test_sites_are_the_spatial_cross_attention(pipe, probed):
    store = probed[2]["all"]
    names = [s.name for s in store.sites]
    assert len(names) == 16 and all(n.endswith("attentions.0.transformer_blocks.0.attn2") or ".attentions." in n
                                    for n in names)
    assert not any("motion_modules" in n for n in names)  # temporal self-attention: not sites
    motion = [n for n, m in pipe.unet.named_modules() if "motion_modules" in n and n.endswith(("attn1", "attn2"))]
    assert motion and not set(motion) & set(names)


def test_frame_record_and_shape(probed):
    store = probed[2]["all"]
    assert store.video == {"qt": FRAMES, "latent_frames": FRAMES, "patch": [1, 1, 1], "temporal_compression": 1,
                           "first_frame_alone": True, "frames": FRAMES}
    assert store.grid_dims == ("qt", "qh", "qw")
    first = store[store.sites[0].name]
    assert tuple(first.shape) == (2, 4, 2, FRAMES, 8, 16, 77)  # [call, sample, head, qt, qh, qw, token]
    assert tuple(store[store.sites[-1].name].shape)[3:6] == (FRAMES, 8, 16)
    assert tuple(store["mid_block.attentions.0.transformer_blocks.0.attn2"].shape)[3:6] == (FRAMES, 1, 2)


def test_labels(probed):
    stores = probed[2]
    every = [(s.pass_label, s.text, s.row) for s in stores["all"].samples]
    assert every == [("uncond", "", 0), ("uncond", "", 1), ("cond", PROMPTS[0], 2), ("cond", PROMPTS[1], 3)]
    assert [(s.pass_label, s.text) for s in stores["cond"].samples] == [("cond", p) for p in PROMPTS]
    assert [s.pass_label for s in stores["uncond"].samples] == ["uncond", "uncond"]
    assert all(c.layout == ("uncond", "uncond", "cond", "cond") for c in stores["all"].calls)
    assert stores["cond"].tokens(0)[:4] == ["<|startoftext|>", "a", "dog", "running"]


@pytest.mark.parametrize("passes", ["all", "cond", "uncond"])
def test_maps_equal_float64_reference(pipe, probed, passes):
    store, calls = probed[2][passes], probed[3]
    modules = dict(pipe.unet.named_modules())
    rows = [s.row for s in store.samples]
    assert len(calls) == 2 == len(store.calls)
    for c, seen in enumerate(calls):
        for site in store.sites:
            hidden, text = seen[site.name]
            ref = reference(modules[site.name], hidden, text, FRAMES, (8, 16))[rows]
            if passes == "cond":  # heads="mean"
                ref = ref.mean(1, keepdim=True)
            got = store[site.name][c].double()
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
            torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), rtol=0, atol=1e-5)


def test_frames_differ_and_map_orientation(probed):
    """Frames are not copies of one another (the motion modules mix them), so a wrong (row, frame) order shows."""
    store = probed[2]["all"]
    maps = store[store.sites[0].name][0]
    assert not torch.allclose(maps[:, :, 0], maps[:, :, 1])
    assert not torch.allclose(maps[2], maps[3])


def test_frame_rows_and_states():
    assert frame_rows(slice(2, 4), 3) == slice(6, 12)
    assert frame_rows(None, 3) is None
    rows = frame_rows(torch.tensor([0, 3]), 2)
    assert rows.tolist() == [0, 1, 6, 7]
    states = torch.randn(2, 5, 4).repeat_interleave(3, dim=0)
    view = latent_states(states, 2, 3, "UNetMotionModel")
    assert torch.equal(view, states[::3]) and latent_states(states, 2, 3, "UNetMotionModel") is view
    other = states.clone()
    other[1] += 1  # sample 0's second frame has another prompt
    with pytest.raises(ProbeError, match="differ between its 3 frames"):
        latent_states(other, 2, 3, "UNetMotionModel")
    with pytest.raises(ProbeError, match="not one per \\(row, frame\\) = 9"):
        latent_states(torch.randn(5, 5, 4), 3, 3, "UNetMotionModel")


def test_refused_pipelines_and_options(pipe):
    from diffusers import AnimateDiffVideoToVideoPipeline

    v2v = AnimateDiffVideoToVideoPipeline(**{k: v for k, v in pipe.components.items()
                                             if k in ("vae", "text_encoder", "tokenizer", "unet", "motion_adapter",
                                                      "scheduler")})
    with pytest.raises(AttnprobeError, match="AnimateDiffVideoToVideoPipeline runs UNetMotionModel with an input video"):
        attnprobe.probe(v2v).__enter__()
    pipe.enable_free_noise(context_length=2, context_stride=1)
    try:
        with pytest.raises(AttnprobeError, match="FreeNoise"):
            attnprobe.probe(pipe).__enter__()
    finally:
        pipe.disable_free_noise()
    with pytest.raises(AttnprobeError, match="relations= is not read"):
        attnprobe.probe(pipe, relations="image->image", points=[(0.5, 0.5)]).__enter__()
