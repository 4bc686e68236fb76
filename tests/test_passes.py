"""Batch rows of pipelines whose batch is not ``[uncond, cond]`` (attnprobe.capture.passes): perturbed-attention
guidance and InstructPix2Pix labelled by their blocks, checked against hooks of our own (each sample's map is the
attention of the row it names, recomputed from ``to_q``/``to_k``; its text is what that row was conditioned on);
pipelines attnprobe does not label are refused before their first denoiser call."""

from __future__ import annotations

import warnings

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
    assert torch.equal(torch.as_tensor(out.images), torch.as_tensor(plain.images))  # bit-identical with the probe on
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
    assert store.meta["row_evidence"] == "encode_prompt"
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
    store = _check(pipe, run, [("cond", 0, 0, prompts[0]), ("cond", 1, 0, prompts[1]), ("image", 0, 0, ""),
                               ("image", 1, 0, ""), ("uncond", 0, 0, ""), ("uncond", 1, 0, "")])
    assert store.meta["row_evidence"] == "consistent"  # its _encode_prompt returns the batch: rows checked by label


def test_safe_latent_diffusion_rows(parts):
    import diffusers

    if not hasattr(diffusers, "StableDiffusionPipelineSafe"):
        pytest.skip(f"diffusers {diffusers.__version__} has no StableDiffusionPipelineSafe")
    keep = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    pipe = diffusers.StableDiffusionPipelineSafe(**{k: parts[k] for k in keep}, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.safety_concept = "a picture of cat"
    prompts = ["a picture of dog", "a red house"]
    run = lambda: pipe(prompts, generator=torch.Generator().manual_seed(0), guidance_scale=7.5,
                       sld_guidance_scale=1000, sld_warmup_steps=0, num_inference_steps=2, height=64, width=64,
                       output_type="np")
    _check(pipe, run, [("uncond", 0, 0, ""), ("uncond", 1, 0, ""), ("cond", 0, 0, prompts[0]),
                       ("cond", 1, 0, prompts[1]), ("safety", 0, 0, "a picture of cat"),
                       ("safety", 1, 0, "a picture of cat")])


@pytest.mark.parametrize("name", ["StableDiffusionPanoramaPipeline", "CycleDiffusionPipeline", "MyPanorama"])
def test_a_pipeline_attnprobe_does_not_label_is_refused_before_its_first_call(parts, name):
    import diffusers
    from diffusers import DDIMScheduler

    # a user's subclass runs its base's recipe: refused as that base
    cls = getattr(diffusers, name, None) or type(name, (StableDiffusionPanoramaPipeline,), {})
    if name == "CycleDiffusionPipeline":
        keep = ("vae", "text_encoder", "tokenizer", "unet")
        pipe = cls(**{k: parts[k] for k in keep}, scheduler=DDIMScheduler.from_config(parts["scheduler"].config),
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        run = lambda: pipe("a picture of dog", source_prompt="a picture of cat", num_inference_steps=2,
                           image=torch.rand(1, 3, 64, 64), output_type="latent")
    else:
        pipe = cls(**parts)
        run = lambda: pipe("a picture of dog", **RUN)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        said = name if hasattr(diffusers, name) else rf"{name} \(a StableDiffusionPanoramaPipeline\)"
        with pytest.raises(ProbeError, match=f"{said} (runs|batches) .* which attnprobe does not label"):
            with attnprobe.probe(pipe):
                run()
    finally:
        hook.remove()
    assert calls == []
    assert not any(type(p).__name__ == "ProbeProcessor" for p in pipe.unet.attn_processors.values())


def test_prompt_first_pipelines_name_their_blocks_in_their_order():
    from attnprobe.capture.passes import PROMPT_FIRST, REFUSED, blocks

    lumina = type("LuminaPipeline", (), {})()
    assert "LuminaPipeline" in PROMPT_FIRST and not set(PROMPT_FIRST) & set(REFUSED)
    assert blocks(lumina, guidance=True) == (("cond", "prompt"), ("uncond", "negative"))
    assert blocks(lumina, guidance=False) == (("cond", "prompt"),)


def test_a_pipeline_method_other_than_call_running_the_denoiser_is_refused(parts):
    from diffusers import DDIMInverseScheduler, StableDiffusionDiffEditPipeline

    keep = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    pipe = StableDiffusionDiffEditPipeline(
        **{k: parts[k] for k in keep}, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        inverse_scheduler=DDIMInverseScheduler.from_config(parts["scheduler"].config))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    # generate_mask runs [source, target] rows outside __call__: no recipe labels them
    with pytest.raises(ProbeError, match=r"StableDiffusionDiffEditPipeline\.generate_mask runs the denoiser outside"):
        with attnprobe.probe(pipe, sites=[SITE], passes="all"):
            pipe.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog", num_inference_steps=2,
                               num_maps_per_mask=1)
    with pytest.raises(ProbeError, match=r"StableDiffusionDiffEditPipeline\.generate_mask runs the denoiser outside"):
        with attnprobe.probe(pipe.unet, sites=[SITE], passes="all"):  # the bare denoiser: the same
            pipe.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog", num_inference_steps=2,
                               num_maps_per_mask=1)
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


def _separate_passes_pipeline(parts):
    """A pipeline that runs classifier-free guidance as two denoiser calls per step, cond first, as Wan, Chroma,
    CogView4 and Lumina 2 do (no ``true_cfg_scale``)."""
    from diffusers import StableDiffusionPipeline

    class SeparatePassesPipeline(StableDiffusionPipeline):
        @torch.no_grad()
        def __call__(self, prompt, negative_prompt=None, guidance_scale=5.0, num_inference_steps=2, generator=None):
            self._guidance_scale, self._clip_skip = guidance_scale, None
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt, "cpu", 1, self.do_classifier_free_guidance, negative_prompt)
            self.scheduler.set_timesteps(num_inference_steps)
            latents = torch.randn((prompt_embeds.shape[0], 4, 8, 8), generator=generator)
            for t in self.scheduler.timesteps:
                noise_pred = self.unet(latents, t, encoder_hidden_states=prompt_embeds).sample
                if self.do_classifier_free_guidance:
                    noise_uncond = self.unet(latents, t, encoder_hidden_states=negative_prompt_embeds).sample
                    noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents).prev_sample
            return latents

    pipe = SeparatePassesPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_passes_run_as_separate_denoiser_calls_are_labelled_per_call(parts):
    pipe = _separate_passes_pipeline(parts)
    prompts = ["a picture of dog", "a red house"]
    run = lambda: pipe(prompts, negative_prompt=["blurry"] * 2, generator=torch.Generator().manual_seed(0))
    with attnprobe.probe(pipe, sites=[SITE], passes="cond", dtype=torch.float32) as cond:
        with attnprobe.probe(pipe, sites=[SITE], passes="uncond", dtype=torch.float32) as uncond:
            out, states, probs = _reference(pipe, run)
    assert torch.equal(out, run())
    assert len(probs) == 4  # per step: the conditional call, then the unconditional one
    for store, label, calls, text in ((cond, "cond", (0, 2), prompts), (uncond, "uncond", (1, 3), ["blurry"] * 2)):
        assert [(s.pass_label, s.prompt_index, s.text) for s in store.samples] == [
            (label, 0, text[0]), (label, 1, text[1])]
        assert store.meta["separate_uncond_calls"] and [c.layout for c in store.calls] == [(label, label)] * 2
        for i, c in enumerate(calls):
            torch.testing.assert_close(store[SITE][i].flatten(2, 3).double(), probs[c], rtol=0, atol=1e-6)
    with pytest.raises(ProbeError, match="passes='all', but SeparatePassesPipeline runs the unconditional pass as separate"):
        with attnprobe.probe(pipe, passes="all"):
            run()


def _switch_guidance_off(pipe, step, timestep, kwargs):
    """diffusers' recipe for dynamic classifier-free guidance: after step 1, keep the conditional rows only."""
    if step == 1:
        kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        pipe._guidance_scale = 0.0
    return kwargs


def test_guidance_switched_off_inside_a_pipeline_call(parts):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a picture of dog", "a picture of cat"]

    def run():
        pipe._guidance_scale = 7.5
        return pipe(prompts, generator=torch.Generator().manual_seed(0), callback_on_step_end=_switch_guidance_off,
                    callback_on_step_end_tensor_inputs=["prompt_embeds"], **{**RUN, "num_inference_steps": 4})

    with attnprobe.probe(pipe, sites=[SITE], passes="all", dtype=torch.float32) as store:
        out, states, probs = _reference(pipe, run)
    assert torch.equal(out.images, run().images)
    assert [c.generation for c in store.calls] == [0, 0, 0, 0]  # one pipeline call, not two
    assert [c.layout for c in store.calls] == [("uncond",) * 2 + ("cond",) * 2] * 2 + [("cond", "cond")] * 2
    assert [(s.pass_label, s.prompt_index) for s in store.samples] == [("uncond", 0), ("uncond", 1), ("cond", 0), ("cond", 1)]
    maps = store[SITE].flatten(3, 4).double()  # [call, sample, head, query, token]
    for c, p in enumerate(probs):
        for i, s in enumerate(store.samples):
            row = s.row if c < 2 else (s.prompt_index if s.pass_label == "cond" else None)
            if row is None:  # no unconditional row once guidance is off: NaN, said by the call's layout
                assert torch.isnan(maps[c, i]).all()
            else:
                torch.testing.assert_close(maps[c, i], p[row], rtol=0, atol=1e-6)
                assert torch.equal(states[c][row], states[0][s.row])  # the row the sample was in the first call

    with attnprobe.probe(pipe, sites=[SITE], passes="cond") as cond:
        run()
    assert len(cond.calls) == 4 and not torch.isnan(cond[SITE].float()).any()
    with pytest.raises(ProbeError, match="an aggregate cannot average a sample over calls it is missing from"):
        with attnprobe.probe(pipe, sites=[SITE], passes="all", aggregate="mean"):
            run()


def test_conditioning_edited_inside_a_pipeline_call_is_not_labelled_with_the_old_text(parts):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    other = pipe.encode_prompt("a picture of cat", "cpu", 1, True)

    def swap(pipe, step, timestep, kwargs):  # prompt switching: the conditional row gets another prompt's encoding
        if step == 0:
            kwargs["prompt_embeds"] = torch.cat([kwargs["prompt_embeds"][:1], other[0]])
        return kwargs

    with pytest.warns(UserWarning, match=r"the conditioning of samples \[0\] changed inside the pipeline call"):
        with attnprobe.probe(pipe, sites=[SITE]) as store:
            pipe("a picture of dog", callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                 **{**RUN, "num_inference_steps": 3})
    finite = [not torch.isnan(store[SITE][c].float()).any() for c in range(3)]
    assert finite == [True, False, False] and store.samples[0].text == "a picture of dog"


def test_rows_whose_conditioning_contradicts_their_position_are_unknown(parts):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)

    def flip(module, args, kwargs):  # a third-party hook that reorders the conditioning: [cond, uncond]
        return args, {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"].flip(0)}

    hook = pipe.unet.register_forward_pre_hook(flip, with_kwargs=True)
    try:
        with pytest.warns(attnprobe.AttnprobeWarning,
                          match="row 0: uncond of prompt 0, row 1: cond of prompt 0 carry other conditioning") as seen:
            with attnprobe.probe(pipe, sites=[SITE], passes="all") as store:
                pipe("a picture of dog", **RUN)
        # attributed to the line that called the pipeline, not to the hook inside torch that noticed
        assert {(w.filename, w.lineno) for w in seen} == {(__file__, seen[0].lineno)}
        assert "pipe(" in open(__file__).read().splitlines()[seen[0].lineno - 1]
        with pytest.raises(ProbeError, match=r"rows is all \['unknown'\] \(rows whose conditioning contradicts"):
            with pytest.warns(UserWarning, match="carry other conditioning"):
                with attnprobe.probe(pipe, sites=[SITE], passes="cond"):
                    pipe("a picture of dog", **RUN)
    finally:
        hook.remove()
    assert [(s.pass_label, s.prompt_index, s.text) for s in store.samples] == [("unknown", -1, None)] * 2
    assert store.meta["row_evidence"] == "contradicted"
    with pytest.raises(attnprobe.ConceptError, match=r"sample 0 \(unknown pass, prompt -1\) is a batch row whose conditioning contradicts"):
        store.token_indices(0, "dog")
    with attnprobe.probe(pipe, sites=[SITE]) as store:
        pipe("a picture of dog", **RUN)
    assert store.meta["row_evidence"] == "encode_prompt"  # every row equals the encoding its label names


def test_a_processor_that_edits_the_probabilities_is_named_once(parts):
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor

    class Reweight(AttnProcessor):  # Prompt-to-Prompt's reweighting: token 2's weight set to 0 after the softmax
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            scores = attn.get_attention_scores
            attn.get_attention_scores = lambda q, k, mask=None: scores(q, k, mask).index_fill(-1, torch.tensor([2]), 0)
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            finally:
                del attn.get_attention_scores

    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe("a picture of dog", generator=torch.Generator().manual_seed(0), **RUN)
    with attnprobe.probe(pipe) as store:
        run()
    assert {c["verdict"] for c in store.meta["processor_check"].values()} == {"equal"}
    attn = pipe.unet.get_submodule(SITE)
    original = attn.processor
    attn.set_processor(Reweight())
    try:
        plain = run().images
        with pytest.warns(UserWarning, match=rf"1 site\(s\) \['{SITE}'\]: the output of their processor Reweight is not the recorded"):
            with attnprobe.probe(pipe) as store:
                _, states, probs = _reference(pipe, run)
        assert torch.equal(run().images, plain)
    finally:
        attn.set_processor(original)
    check = store.meta["processor_check"]
    assert check[SITE]["verdict"] == "differs" and check[SITE]["processor"] == "Reweight"
    assert sum(c["verdict"] == "differs" for c in check.values()) == 1
    # the store holds the unedited softmax, as the reference does: the model used 0 at token 2
    torch.testing.assert_close(store[SITE][0, 0].flatten(1, 2).double(), probs[0][1], rtol=0, atol=1e-3)
    assert float(store[SITE][0, 0, ..., 2].float().min()) > 0


def test_a_long_prompt_encoded_in_chunks_has_unknown_positions(parts):
    from diffusers import StableDiffusionPipeline

    from attnprobe.errors import ConceptError

    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    text = "a picture of dog " + "and a garden " * 30  # past 77 tokens: compel and sd_embed encode it in 2 chunks
    words = pipe.tokenizer(text, add_special_tokens=False).input_ids
    chunks = [words[:75], words[75:150]]
    bos, eos = pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id
    with torch.no_grad():
        embed = lambda ids: pipe.text_encoder(torch.tensor([[bos, *ids, eos] + [eos] * (75 - len(ids))]))[0]
        prompt_embeds = torch.cat([embed(c) for c in chunks], dim=1)  # [1, 154, hidden]
        negative = torch.cat([embed([])] * 2, dim=1)
    with pytest.warns(UserWarning, match="154 text positions, more than one encoding of"):
        with attnprobe.probe(pipe, sites=[SITE], prompts=[text]) as store:
            pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, **RUN)
    assert store.samples[0].text == text and set(store.layout(0).kinds) == {"unknown"}
    with pytest.raises(ConceptError, match="token positions of sample 0 .* are unknown"):
        store.token_indices(0, "dog")


# ------------------------------------------------------------------ found by trying to break the labels
def _sd(parts):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_prompt_re_encoded_inside_the_loop_is_not_a_new_pipeline_call(parts):
    pipe = _sd(parts)

    def switch(p, i, t, kwargs):  # prompt switching, with the pipeline's own encode_prompt
        if i == 0:
            positive, negative = p.encode_prompt("a red house", "cpu", 1, True)
            return {"prompt_embeds": torch.cat([negative, positive])}
        return {}

    run = dict(RUN, num_inference_steps=3)
    with pytest.warns(attnprobe.AttnprobeWarning, match=r"conditioning of samples \[0\] changed inside the pipeline"):
        with attnprobe.probe(pipe, sites=[SITE]) as store:
            pipe("a picture of dog", callback_on_step_end=switch, **run)
    assert [c.generation for c in store.calls] == [0, 0, 0] and store.samples[0].text == "a picture of dog"
    nan = store[SITE].float().isnan()
    assert not nan[0].any() and nan[1:].all()


def test_images_dropped_inside_the_loop_are_nan_not_relabelled(parts):
    pipe = _sd(parts)

    def drop_first_image(p, i, t, kwargs):
        if i == 0:
            return {"latents": kwargs["latents"][1:], "prompt_embeds": kwargs["prompt_embeds"][[1, 3]]}
        return {}

    with pytest.warns(attnprobe.AttnprobeWarning, match="batch changed from 2 to 1 rows per pass"):
        with attnprobe.probe(pipe, sites=[SITE]) as store:
            pipe("a picture of dog", num_images_per_prompt=2, callback_on_step_end=drop_first_image,
                 callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **RUN)
    assert [(s.prompt_index, s.image_index) for s in store.samples] == [(0, 0), (0, 1)]
    assert store[SITE][1].float().isnan().all() and not store[SITE][0].float().isnan().any()


def test_prompt_embeds_with_several_images_per_prompt(parts):
    pipe = _sd(parts)
    positive, _ = pipe.encode_prompt(["a picture of dog", "a red house"], "cpu", 1, False)
    with attnprobe.probe(pipe, sites=[SITE]) as store:
        pipe(prompt_embeds=positive, num_images_per_prompt=2, **RUN)
    assert [(s.prompt_index, s.image_index) for s in store.samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert store.meta["num_images_per_prompt"] == 2
    with pytest.raises(ProbeError, match=r"gave 1 texts, but this pipeline call encodes 2 prompts"):
        with attnprobe.probe(pipe, prompts=["a picture of dog"]):
            pipe(prompt_embeds=positive, **RUN)


def test_the_encode_prompt_watch_follows_the_class_and_leaves_a_users_own(parts):
    from unittest import mock

    pipe = _sd(parts)
    original = type(pipe).encode_prompt

    def louder(self, *args, **kwargs):
        positive, negative = original(self, *args, **kwargs)
        return positive * 2, negative

    run = lambda: pipe("a picture of dog", generator=torch.Generator().manual_seed(0), **RUN).images
    with mock.patch.object(type(pipe), "encode_prompt", louder):
        plain = run()
    with attnprobe.probe(pipe, sites=[SITE]):
        with mock.patch.object(type(pipe), "encode_prompt", louder):  # patched inside the probe: it runs
            assert torch.equal(run(), plain)
        own = lambda *a, **k: original(pipe, *a, **k)
        pipe.__dict__["encode_prompt"] = own  # a user's own, set inside the probe: it stays
    assert pipe.__dict__.get("encode_prompt") is own
    del pipe.__dict__["encode_prompt"]


def test_warnings_turned_into_errors_leave_a_closed_store(parts):
    pipe = _sd(parts)
    attn = pipe.unet.get_submodule(SITE)
    original = attn.processor

    class DoubleKeys(type(original)):  # edits the attention: the processor check warns
        def __call__(self, attn, *args, **kwargs):
            hook = attn.to_k.register_forward_hook(lambda m, a, o: o * 2)
            try:
                return super().__call__(attn, *args, **kwargs)
            finally:
                hook.remove()

    attn.set_processor(DoubleKeys())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", category=attnprobe.AttnprobeWarning)
            with pytest.raises(attnprobe.AttnprobeWarning):
                with attnprobe.probe(pipe, sites=[SITE]) as store:
                    pipe("a picture of dog", **RUN)
    finally:
        attn.set_processor(original)
    assert store.meta["complete"] is False and store.meta["processor_check"][SITE]["verdict"] == "differs"


def test_conditioning_changed_between_the_denoiser_and_a_site_is_said(parts):
    pipe = _sd(parts)
    flip = lambda m, a, k: (a, {**k, "encoder_hidden_states": k["encoder_hidden_states"].flip(0)})
    block = pipe.unet.get_submodule(SITE.removesuffix(".attn2"))
    attn = pipe.unet.get_submodule(SITE)
    original = attn.processor

    class Flip(type(original)):  # reorders the rows before projecting its keys
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            return super().__call__(attn, hidden_states, encoder_hidden_states.flip(0), *args, **kwargs)

    for where in ("unet after the probe", "block", "processor"):
        if where == "processor":
            attn.set_processor(Flip())
        try:
            with pytest.warns(attnprobe.AttnprobeWarning, match=r"attend to other encoder_hidden_states than the"):
                with attnprobe.probe(pipe, passes="all") as store:
                    hook = (pipe.unet.register_forward_pre_hook(flip, with_kwargs=True) if where != "block"
                            else block.register_forward_pre_hook(flip, with_kwargs=True)) if where != "processor" else None
                    try:
                        pipe(["a picture of dog", "a red house"], **RUN)
                    finally:
                        if hook is not None:
                            hook.remove()
        finally:
            attn.set_processor(original)
        check = store.meta["processor_check"]
        moved = sorted(k for k, v in check.items() if v["conditioning"] == "differs")
        assert store.meta["row_evidence"] == "contradicted"
        assert moved == (sorted(check) if where == "unet after the probe" else [SITE]), where
    with attnprobe.probe(pipe, passes="all") as store:
        pipe(["a picture of dog", "a red house"], **RUN)
    assert {v["conditioning"] for v in store.meta["processor_check"].values()} == {"equal"}


def test_one_step_pipeline_calls_are_told_apart(parts):
    pipe = _sd(parts)
    assert not isinstance(getattr(type(pipe.scheduler), "step_index", None), property)  # DDIM: no step index
    one = dict(RUN, num_inference_steps=1)
    for target in (pipe, pipe.unet):  # the same timestep in both calls: the pipeline's loop index tells
        with attnprobe.probe(target, sites=[SITE]) as store:
            pipe(["a picture of dog", "a red house"], **one)
            pipe(["a picture of dog", "a red house"], **one)
        assert [c.generation for c in store.calls] == [0, 1]
        with pytest.raises(ProbeError, match="pipeline call 1 has"):
            with attnprobe.probe(target, sites=[SITE]):
                pipe(["a picture of dog", "a red house"], **one)
                pipe(["a red house", "a picture of dog"], **one)
