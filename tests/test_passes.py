"""Batch rows of pipelines whose batch is not ``[uncond, cond]`` (attnprobe.capture.passes): perturbed-attention
guidance and InstructPix2Pix labelled by their blocks, checked against hooks of our own (each sample's map is the
attention of the row it names, recomputed from ``to_q``/``to_k``; its text is what that row was conditioned on);
pipelines attnprobe does not label are refused before their first denoiser call."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPanoramaPipeline,
    UNet2DConditionModel,
)

import attnprobe
from attnprobe.capture.passes import PASS_LABELS
from attnprobe.errors import ProbeError
from attnprobe.models.configs import SD15_UNET
from attnprobe.testing import tiny_sd_pipeline

SITE = "mid_block.attentions.0.transformer_blocks.0.attn2"
RUN = dict(num_inference_steps=2, height=64, width=64, output_type="latent")


@pytest.fixture(scope="module")
def parts():
    return tiny_sd_pipeline().components


def _pag(parts):
    pipe = StableDiffusionPAGPipeline(**parts, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pix2pix(parts):
    torch.manual_seed(5)
    unet = UNet2DConditionModel(**dict(SD15_UNET, block_out_channels=(16, 16, 32, 32), cross_attention_dim=32,
                                       attention_head_dim=2, sample_size=8, in_channels=8), norm_num_groups=8).eval()
    pipe = StableDiffusionInstructPix2PixPipeline(**{**parts, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _probs(attn, q, k):
    b, h = q.shape[0], attn.heads
    q = q.view(b, q.shape[1], h, -1).transpose(1, 2).double()
    k = k.view(b, k.shape[1], h, -1).transpose(1, 2).double()
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)


def _reference(pipe, run):
    """Per denoiser call: the site's probabilities ``[batch, head, query, key]`` and the batch's conditioning."""
    attn = pipe.unet.get_submodule(SITE)
    qk, states, probs = {}, [], []
    hooks = [
        attn.to_q.register_forward_hook(lambda m, a, o: qk.__setitem__("q", o)),
        attn.to_k.register_forward_hook(lambda m, a, o: qk.__setitem__("k", o)),
        attn.register_forward_hook(lambda m, a, o: probs.append(_probs(m, qk["q"], qk["k"]))),
        pipe.unet.register_forward_pre_hook(
            lambda m, a, kw: states.append(kw["encoder_hidden_states"].clone()), with_kwargs=True),
    ]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return out, states, probs


def _check(pipe, run, expect):
    """Probe (all passes) and compare every sample with the reference row it names."""
    with attnprobe.probe(pipe, sites=[SITE], passes="all", dtype=torch.float32) as store:
        out, states, probs = _reference(pipe, run)
    plain = run()
    assert torch.equal(out.images, plain.images)  # bit-identical with the probe on
    got = [(s.pass_label, s.prompt_index, s.image_index, s.text) for s in store.samples]
    assert got == expect and len({g[:3] for g in got}) == len(got)
    assert {s.pass_label for s in store.samples} <= set(PASS_LABELS)
    maps = store[SITE]  # [call, sample, head, qh, qw, token]
    for c, p in enumerate(probs):
        for i, s in enumerate(store.samples):
            torch.testing.assert_close(maps[c, i].flatten(1, 2).double(), p[s.row], rtol=0, atol=1e-6)
    for s in store.samples:  # the row holds the encoding of the text it is labelled with
        ids = pipe.tokenizer(s.text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(states[0][s.row], pipe.text_encoder(ids)[0][0], rtol=0, atol=1e-5)
    return store


def test_perturbed_attention_guidance_rows(parts):
    pipe = _pag(parts)
    prompts = ["a picture of dog", "a picture of cat"]
    run = lambda: pipe(prompts, generator=torch.Generator().manual_seed(0), pag_scale=3.0, guidance_scale=7.5, **RUN)
    store = _check(pipe, run, [("uncond", 0, 0, ""), ("uncond", 1, 0, ""), ("cond", 0, 0, prompts[0]),
                               ("cond", 1, 0, prompts[1]), ("perturbed", 0, 0, prompts[0]),
                               ("perturbed", 1, 0, prompts[1])])
    assert store.calls[0].layout == ("uncond", "uncond", "cond", "cond", "perturbed", "perturbed")
    # without guidance: [cond, perturbed]; one image of one prompt used to abort ("odd size 3")
    run = lambda: pipe("a picture of dog", generator=torch.Generator().manual_seed(0), pag_scale=3.0,
                       guidance_scale=1.0, num_images_per_prompt=2, **RUN)
    _check(pipe, run, [("cond", 0, 0, "a picture of dog"), ("cond", 0, 1, "a picture of dog"),
                       ("perturbed", 0, 0, "a picture of dog"), ("perturbed", 0, 1, "a picture of dog")])
    assert not any(type(m.processor).__name__.startswith("PAG") for m in pipe.unet.attn_processors.values()
                   if hasattr(m, "processor"))


def test_instruct_pix2pix_rows(parts):
    pipe = _pix2pix(parts)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompts = ["make it a dog", "make it a cat"]
    run = lambda: pipe(prompts, image=image.expand(2, -1, -1, -1), generator=torch.Generator().manual_seed(0),
                       guidance_scale=7.5, **{k: v for k, v in RUN.items() if k not in ("height", "width")})
    _check(pipe, run, [("cond", 0, 0, prompts[0]), ("cond", 1, 0, prompts[1]), ("image", 0, 0, ""),
                       ("image", 1, 0, ""), ("uncond", 0, 0, ""), ("uncond", 1, 0, "")])


def test_a_pipeline_attnprobe_does_not_label_is_refused_before_its_first_call(parts):
    pipe = StableDiffusionPanoramaPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ProbeError, match="StableDiffusionPanoramaPipeline runs one denoiser call per view"):
            with attnprobe.probe(pipe):
                pipe("a picture of dog", **RUN)
    finally:
        hook.remove()
    assert calls == []
    assert not any(type(p).__name__ == "ProbeProcessor" for p in pipe.unet.attn_processors.values())


def test_another_pipeline_sharing_the_denoiser_is_refused(parts):
    from diffusers import StableDiffusionPipeline

    probed, other = StableDiffusionPipeline(**parts), StableDiffusionPipeline(**parts)
    for pipe in (probed, other):
        pipe.set_progress_bar_config(disable=True)
    with attnprobe.probe(probed) as store:
        with pytest.raises(ProbeError, match=r"another pipeline object \(StableDiffusionPipeline\) that shares it"):
            other("a picture of dog", **RUN)
        probed("a picture of dog", **RUN)  # the probed pipeline still records
    assert len(store.calls) == 2 and store.samples[0].text == "a picture of dog"
