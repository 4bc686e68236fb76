"""The families whose text keys or sites need more than the first ones did: Z-Image (each row's own caption joined
with the image in padded sequences), Kandinsky 3 (a UNet whose self-attention looks like cross-attention), HiDream
(a padded image stream, three text streams), HunyuanImage (each row's keys reordered by its masks) and Stable
Cascade's prior (image queries over [image; text; pooled text and image embedding] keys; its decoder refused); tiny
pipelines (``attnprobe.testing.tiny_pipeline``), CPU.

The float64 references never touch attnprobe: our own pre-forward hooks keep each attention module's inputs, q and k
are recomputed from a float64 copy of the module (with our own complex rotary embedding for Z-Image), and the softmax
over all keys of each row is taken in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnprobe
from attnprobe.errors import ProbeError
from attnprobe.models.coverage import pipeline_verdicts
from attnprobe.testing import tiny_pipeline
from test_families import Inputs


def _recorded(pipe, prompt, passes, **kwargs):
    """One generation without the probe and one with it (fp32 maps, ``passes``) under our own input hooks on every
    site: asserts the images are bit-identical; returns ``(images, store, hooks, sites)``."""
    run = lambda: pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kwargs).images  # noqa: E731
    plain = run()
    sites = attnprobe.list_sites(pipe)
    with Inputs(attnprobe.capture.denoiser_of(pipe), [s.name for s in sites]) as seen, attnprobe.probe(
            pipe, passes=passes, dtype=torch.float32) as store:
        probed = run()
    assert torch.equal(plain, probed)
    return plain, store, seen, sites


@pytest.fixture(scope="module")
def zimage():
    return tiny_pipeline("zimage")


def _rope_complex(x, freqs):
    """Consecutive channel pairs as complex numbers times the complex table ``[batch, seq, d/2]`` (complex128)."""
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * freqs.to(torch.complex128)[:, :, None, :]).flatten(-2)


@torch.no_grad()
def test_zimage_padded_rows_of_other_caption_lengths_against_a_float64_reference(zimage):
    """(ZImagePipeline rewrites a prompt list in place: each call gets a copy.) Z-Image's row is [24 image positions; 8 image pads; its caption; caption pads to 32; batch padding]: the map
    is the image queries' softmax over all of that row's keys, at its own caption's positions; the prompts' rows come
    before the negative prompts'."""
    pipe = zimage
    prompts = ["a picture of dog", "a much longer picture of a brown dog on the grass"]
    kwargs = dict(num_inference_steps=2, height=64, width=96, output_type="latent", max_sequence_length=64)
    plain = pipe(prompt=list(prompts), generator=torch.Generator().manual_seed(0), **kwargs).images
    sites = attnprobe.list_sites(pipe)
    lens = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a: lens.append([len(c) for c in a[2]]))
    try:
        with Inputs(pipe.transformer, [s.name for s in sites]) as seen, attnprobe.probe(
                pipe, passes="all", dtype=torch.float32) as store:
            probed = pipe(prompt=list(prompts), generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        hook.remove()
    assert torch.equal(plain, probed) and [s.name for s in sites] == ["layers.0.attention", "layers.1.attention"]
    assert [(s.pass_label, s.prompt_index, s.row) for s in store.samples] == [
        ("cond", 0, 0), ("cond", 1, 1), ("uncond", 0, 2), ("uncond", 1, 3)]
    assert store.meta["row_evidence"] == "encode_prompt" and store.samples[1].text == prompts[1]  # as given
    assert len(set(lens[0])) == 3 and store.token_indices(0, "dog") == [[5]] and store.token_indices(1, "dog") == [[9]]
    assert store[sites[0].name].shape[3:5] == (4, 6)  # 64 × 96 px: VAE 8×, patches 2×2
    n_image, text_start = 24, 32
    for site in sites:
        a = copy.deepcopy(pipe.transformer.get_submodule(site.name)).double()
        for call in range(len(store.calls)):
            inputs = seen.seen[site.name][store.calls[call].index]
            h = inputs["hidden_states"].double()
            q = _rope_complex(a.norm_q(a.to_q(h).unflatten(-1, (a.heads, -1))), inputs["freqs_cis"])
            k = _rope_complex(a.norm_k(a.to_k(h).unflatten(-1, (a.heads, -1))), inputs["freqs_cis"])
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
            mask = inputs.get("attention_mask")
            if mask is not None:
                logits = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
            probs = logits.softmax(-1)
            got = store[site.name][call].flatten(2, 3).double()  # [sample, head, image, token]
            assert got.shape[2] == n_image
            for sample in store.samples:
                length = lens[store.calls[call].index][sample.row]
                want = torch.zeros_like(got[sample.index])
                want[..., :length] = probs[sample.row, :, :n_image, text_start:text_start + length]
                assert (got[sample.index] - want).abs().max() <= 1e-6, (site.name, call, sample)
                # the rest of the row's softmax: its image, its pads and its caption pads
                assert float(probs[sample.row, :, :n_image, :text_start].sum(-1).min()) > 0


def test_zimage_guidance_cut_inside_the_call_keeps_the_conditional_rows(zimage):
    """``cfg_truncation`` drops the unconditional rows after 20 % of the schedule while the pipeline's
    ``do_classifier_free_guidance`` still says on: the one remaining block is checked against the first call's
    conditional rows and recorded as them; the unconditional samples get NaN from then on."""
    kwargs = dict(num_inference_steps=4, height=64, width=96, output_type="latent", max_sequence_length=32,
                  cfg_truncation=0.2)
    plain = zimage(prompt="a dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    with attnprobe.probe(zimage, passes="all") as store:
        probed = zimage(prompt="a dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(plain, probed)
    assert [c.layout for c in store.calls] == [("cond", "uncond")] * 2 + [("cond",)] * 2
    maps = store[store.sites[0].name].float()
    assert not maps[:, 0].isnan().any() and maps[2:, 1].isnan().all() and not maps[:2, 1].isnan().any()


@pytest.fixture(scope="module")
def kandinsky3():
    return tiny_pipeline("kandinsky3")


@torch.no_grad()
def test_kandinsky3_cross_attention_blocks_against_a_float64_reference(kandinsky3):
    """Only the blocks called with the text are sites (not the image self-attention nor the text pooling, built alike);
    the keys are T5's positions up to one past the longest prompt, the UNet's additive mask (−10000 on padding) in
    the softmax; the empty negative prompt is zero embeddings, all masked: its rows are uniform over the keys."""
    pipe = kandinsky3
    prompts = ["a picture of dog", "a much longer picture of a brown dog"]
    kwargs = dict(num_inference_steps=2, height=64, width=96, output_type="latent")
    plain, store, seen, sites = _recorded(pipe, prompts, "all", **kwargs)
    names = [s.name for s in sites]
    assert names == [f"{part}_blocks.{level}.attentions.{i}.attention"
                     for part, levels in (("down", (1, 2, 3)), ("up", (0, 1, 2))) for level in levels for i in (1, 2)]
    assert "down_blocks.1.attentions.0.attention" not in names and "add_time_condition.attention" not in names
    assert [(s.pass_label, s.prompt_index) for s in store.samples] == [
        ("uncond", 0), ("uncond", 1), ("cond", 0), ("cond", 1)]
    n_keys = len(pipe.tokenizer(prompts[1]).input_ids) + 1  # the longest prompt and </s>, then one pad
    assert store[names[0]].shape[-1] == n_keys and store.tokens(3)[-1] == "<pad>"
    assert store.token_indices(2, "dog") == [[3]] and store.token_indices(3, "dog") == [[7]]
    assert store[names[0]].shape[3:5] == (4, 8) and store[names[-1]].shape[3:5] == (4, 8)  # 64 × 128 px (rounded up)
    assert store[names[4]].shape[3:5] == (1, 2)
    assert store.meta["image_size"] == [64, 128]  # the movq's 8× (the pipeline has no vae_scale_factor)
    for site in sites:
        a = copy.deepcopy(pipe.unet.get_submodule(site.name)).double()
        for call in range(len(store.calls)):
            inputs = seen.seen[site.name][store.calls[call].index]
            q = a.to_q(inputs["hidden_states"].double()).unflatten(-1, (a.heads, -1)).transpose(1, 2)
            k = a.to_k(inputs["encoder_hidden_states"].double()).unflatten(-1, (a.heads, -1)).transpose(1, 2)
            logits = q @ k.transpose(-1, -2) * a.scale + inputs["attention_mask"].double()[:, None]
            want = logits.softmax(-1)[[s.row for s in store.samples]]
            got = store[site.name][call].flatten(2, 3).double()
            assert (got - want).abs().max() <= 1e-6, (site.name, call)
    uniform = store[names[0]][:, :2].float()
    assert torch.allclose(uniform, torch.full_like(uniform, 1 / n_keys))


@pytest.fixture(scope="module")
def hidream():
    return tiny_pipeline("hidream")


def _rotate_pairs(x, table):
    """Consecutive channel pairs rotated by the model's ``[.., pair, 2, 2]`` rotation table (float64)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = table[..., 0, 0].double(), table[..., 1, 0].double()
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)


@torch.no_grad()
def test_hidream_padded_image_stream_and_three_text_streams_against_a_float64_reference(hidream):
    """A non-square latent is padded to 64 image positions: zero keys that share each softmax, queries that are not
    image positions. Each block's text is [T5; Llama's last listed layer; Llama's layer for the block], so the token
    axis holds T5's 16 then Llama's 16 twice, and a concept is found in all three."""
    pipe = hidream
    prompts = ["a picture of dog", "a much longer picture of a brown dog"]
    kwargs = dict(num_inference_steps=2, height=64, width=96, max_sequence_length=16, output_type="latent")
    plain, store, seen, sites = _recorded(pipe, prompts, "all", **kwargs)
    assert plain.shape[-2:] == (6, 8)  # 48 × 64 px: scaled to the 64² px area
    assert [(s.name, s.kind) for s in sites] == [("double_stream_blocks.0.block.attn1", "joint"), (
        "single_stream_blocks.0.block.attn1", "single"), ("single_stream_blocks.1.block.attn1", "single")]
    assert [(s.pass_label, s.prompt_index) for s in store.samples] == [
        ("uncond", 0), ("uncond", 1), ("cond", 0), ("cond", 1)]
    assert store.token_indices(2, "dog") == [[3, 20, 36]] and store.token_indices(3, "dog") == [[7, 24, 40]]
    n_image, n_text = 12, 48  # 3 × 4 patches; 16 T5 + 2 × 16 Llama positions
    for site in sites:
        a = copy.deepcopy(pipe.transformer.get_submodule(site.name)).double()
        assert store[site.name].shape[3:] == (3, 4, n_text)
        for call in range(len(store.calls)):
            inputs = seen.seen[site.name][store.calls[call].index]
            h, mask = inputs["norm_hidden_states"].double(), inputs["hidden_states_masks"]
            heads = lambda x: x.unflatten(-1, (a.heads, -1))  # noqa: E731
            q, k = heads(a.q_rms_norm(a.to_q(h))), heads(a.k_rms_norm(a.to_k(h)))
            k = k * mask.double()[:, :, None, None]
            if site.kind == "joint":
                e = inputs["norm_encoder_hidden_states"].double()
                q = torch.cat([q, heads(a.q_rms_norm_t(a.to_q_t(e)))], dim=1)
                k = torch.cat([k, heads(a.k_rms_norm_t(a.to_k_t(e)))], dim=1)
            table = inputs["image_rotary_emb"]
            q, k = _rotate_pairs(q, table), _rotate_pairs(k, table)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
            probs = logits.softmax(-1)[[s.row for s in store.samples]]
            assert probs.shape[-1] == 64 + n_text  # the padded image stream, then the text
            want = probs[:, :, :n_image, -n_text:]
            got = store[site.name][call].flatten(2, 3).double()
            assert (got - want).abs().max() <= 1e-6, (site.name, call)
            assert float(probs[:, :, :n_image, n_image:64].sum(-1).min()) > 0  # the pad keys take some


@pytest.fixture(scope="module")
def hunyuanimage():
    return tiny_pipeline("hunyuanimage")


def _rotate_image(x, cos, sin, n_image):
    """The first ``n_image`` positions' consecutive channel pairs rotated by the model's real tables ``[position,
    channel]`` (float64); the rest (text) as they are."""
    image, rest = x[:, :n_image], x[:, n_image:]
    pairs = image.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    cos, sin = cos.double()[None, :, None], sin.double()[None, :, None]
    return torch.cat([image * cos + turned * sin, rest], dim=1)


@torch.no_grad()
def test_hunyuanimage_rows_reordered_by_their_masks_against_a_float64_reference(hunyuanimage):
    """Each row's text keys are [attended ByT5; attended Qwen; masked ByT5; masked Qwen]: a prompt that quotes
    nothing starts with its words, one that quotes text starts with its glyph bytes (kind 'unknown'); the masked keys
    get 0. Guidance runs through the pipeline's guider as separate calls, conditional first."""
    pipe = hunyuanimage
    prompts = ["a picture of dog", 'a sign that says "dog" and a brown dog']
    kwargs = dict(num_inference_steps=2, height=64, width=128, output_type="latent")
    plain, store, seen, sites = _recorded(pipe, prompts, "cond", **kwargs)
    assert [(s.name, s.kind) for s in sites] == [("transformer_blocks.0.attn", "joint"), (
        "single_transformer_blocks.0.attn", "single"), ("single_transformer_blocks.1.attn", "single")]
    assert len(seen.seen[sites[0].name]) == 4 and len(store.calls) == 2  # cond, uncond per step; cond kept
    assert store.token_indices(0, "dog") == [[3]] and store.token_indices(1, "dog") == [[18, 19, 20], [25]]
    from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

    glyphs = len(pipe.tokenizer_2(extract_glyph_text(prompts[1])).input_ids)  # the quoted text as the pipeline reads it
    assert store.token_kinds(1)[:glyphs] == ["unknown"] * glyphs and store.token_kinds(1)[glyphs] == "word"
    assert store.token_kinds(0)[0] == "word" and "unknown" not in store.token_kinds(0)
    n_image, n_text = 8 * 16, 32 + 16
    for site in sites:
        a = copy.deepcopy(pipe.transformer.get_submodule(site.name)).double()
        assert store[site.name].shape[3:] == (8, 16, n_text)
        for call in range(len(store.calls)):
            inputs = seen.seen[site.name][store.calls[call].index]
            h, e = inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double()
            heads = lambda x: x.unflatten(-1, (a.heads, -1))  # noqa: E731
            if site.kind == "joint":
                q = torch.cat([a.norm_q(heads(a.to_q(h))), a.norm_added_q(heads(a.add_q_proj(e)))], dim=1)
                k = torch.cat([a.norm_k(heads(a.to_k(h))), a.norm_added_k(heads(a.add_k_proj(e)))], dim=1)
            else:
                x = torch.cat([h, e], dim=1)
                q, k = a.norm_q(heads(a.to_q(x))), a.norm_k(heads(a.to_k(x)))
            cos, sin = inputs["image_rotary_emb"]
            q, k = _rotate_image(q, cos, sin, n_image), _rotate_image(k, cos, sin, n_image)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
            logits = logits.masked_fill(~inputs["attention_mask"].bool(), float("-inf"))
            want = logits.softmax(-1)[[s.row for s in store.samples]][:, :, :n_image, n_image:]
            got = store[site.name][call].flatten(2, 3).double()
            assert (got - want).abs().max() <= 1e-6, (site.name, call)
            pad = torch.tensor([kind == "pad" for kind in store.token_kinds(0)])
            assert float(got[0][..., pad].abs().max()) == 0 and float(got[1, ..., :glyphs].sum(-1).min()) > 0


@pytest.fixture(scope="module")
def cascade():
    return tiny_pipeline("cascade-prior")


def _cascade_run(pipe, prompts, **kwargs):
    """Image embeddings without and with a probe (passes="all", fp32), each site's inputs and the prior's clip_text."""
    kwargs = dict(num_inference_steps=2, height=64, width=96, **kwargs)
    plain = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kwargs).image_embeddings
    sites = attnprobe.list_sites(pipe)
    texts = []
    hook = pipe.prior.register_forward_pre_hook(lambda m, a, k: texts.append(k["clip_text"]), with_kwargs=True)
    try:
        with Inputs(pipe.prior, [s.name for s in sites]) as seen, attnprobe.probe(
                pipe, passes="all", dtype=torch.float32) as store:
            probed = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kwargs).image_embeddings
    finally:
        hook.remove()
    assert torch.equal(plain, probed)
    return store, sites, seen, texts


@torch.no_grad()
def _check_cascade(pipe, store, sites, seen, texts, n_after):
    """Every site, call and sample against the float64 softmax of the image queries over all keys
    ``[image (h·w); text (77); n_after]``, taken at the text keys."""
    for site in sites:
        a = copy.deepcopy(pipe.prior.get_submodule(site.name)).double()
        block = pipe.prior.get_submodule(site.name.rpartition(".")[0])
        for call in range(len(store.calls)):
            inputs = seen.seen[site.name][store.calls[call].index]
            x = inputs["hidden_states"].flatten(2).transpose(1, 2)  # the block's norm_x, [batch, h·w, channel]
            kv = inputs["encoder_hidden_states"]
            n_image = x.shape[1]
            assert kv.shape[1] == n_image + 77 + n_after and torch.equal(kv[:, :n_image], x)  # image keys first
            # the 77 keys after the image are the prompt's CLIP positions, as the block maps them
            clip_text = texts[store.calls[call].index]
            mapped = block.kv_mapper(pipe.prior.clip_norm(pipe.prior.clip_txt_mapper(clip_text)))
            assert torch.allclose(kv[:, n_image:n_image + 77], mapped, atol=1e-5)
            q = a.to_q(x.double()).unflatten(-1, (a.heads, -1)).transpose(1, 2)
            k = a.to_k(kv.double()).unflatten(-1, (a.heads, -1)).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) * a.scale).softmax(-1)  # [batch, head, h·w, all keys]
            got = store[site.name][call].flatten(2, 3).double()  # [sample, head, h·w, token]
            for sample in store.samples:
                want = probs[sample.row, :, :, n_image:n_image + 77]
                assert (got[sample.index] - want).abs().max() <= 1e-6, (site.name, call, sample)
            # the pooled text and the image embedding take a share: the rows sum to the text share, under 1
            assert float(probs[..., n_image + 77:].sum(-1).min()) > 0 and float(got.sum(-1).max()) < 1


def test_cascade_prior_against_a_float64_reference(cascade):
    """Stable Cascade's prior: its attention blocks' image queries over [image; CLIP's 77 positions; pooled text × 4;
    image embedding × 4] keys are the sites; the prior's output (image embeddings) is bit-identical with the probe on;
    the prompts' rows come first; the grid is the latent's (64 × 96 px over resolution_multiple 16: 4 × 6)."""
    prompts = ["a picture of dog", "a brown dog"]
    store, sites, seen, texts = _cascade_run(cascade, prompts)
    assert [(s.name, s.kind) for s in sites] == [(f"{part}_blocks.{level}.2.attention", "joint")
                                                 for part in ("down", "up") for level in (0, 1)]
    assert store.meta["family"] == "cascade" and store.meta["row_evidence"] == "encode_prompt"
    assert [(s.pass_label, s.prompt_index, s.row, s.text) for s in store.samples] == [
        ("cond", 0, 0, prompts[0]), ("cond", 1, 1, prompts[1]), ("uncond", 0, 2, ""), ("uncond", 1, 3, "")]
    assert store.token_indices(0, "dog") == [[4]] and store.token_indices(1, "dog") == [[3]]
    assert all(store[s.name].shape[3:] == (4, 6, 77) for s in sites)
    assert all(v["verdict"] == "equal" for v in store.meta["processor_check"].values())
    _check_cascade(cascade, store, sites, seen, texts, n_after=8)


def test_cascade_prior_with_two_image_embeddings_counts_their_keys(cascade):
    """An image prompt of two embeddings adds 4 keys each after the pooled text's 4: the keys after the text are
    counted per call from the prior's arguments, not assumed."""
    image_embeds = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(1))
    store, sites, seen, texts = _cascade_run(cascade, ["a dog"], image_embeds=image_embeds)
    _check_cascade(cascade, store, sites, seen, texts, n_after=12)


def test_cascade_decoder_is_refused_before_anything_runs(cascade):
    """The decoder's UNet attends to the pooled text alone (no token to record): refused, naming why and the prior to
    probe instead, before its text encoder or decoder runs; a combined pipeline (whose denoiser is its decoder) too,
    while a probe of its prior_pipe records the prior's calls as the combined pipeline runs."""
    from diffusers import (DDPMWuerstchenScheduler, StableCascadeCombinedPipeline, StableCascadeDecoderPipeline,
                           StableCascadeUNet)
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    torch.manual_seed(0)
    decoder = StableCascadeUNet(
        in_channels=4, out_channels=4, conditioning_dim=16, block_out_channels=(16, 16), num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1), clip_text_pooled_in_channels=32,
        effnet_in_channels=16, pixel_mapper_in_channels=3, switch_level=(False,), timestep_conditioning_type=("sca",),
    ).eval()
    vqgan = PaellaVQModel(levels=2, bottleneck_blocks=1, embed_dim=8, latent_channels=4, num_vq_embeddings=8)
    pipe = StableCascadeDecoderPipeline(decoder=decoder, tokenizer=cascade.tokenizer, text_encoder=cascade.text_encoder,
                                        scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan)
    ran = []
    hooks = [m.register_forward_pre_hook(lambda *a: ran.append(1)) for m in (decoder, cascade.text_encoder)]
    try:
        with pytest.raises(ProbeError, match="StableCascadeDecoderPipeline .* is Stable Cascade's decoder.*pooled CLIP "
                                             "text embedding alone.*no token.*StableCascadePriorPipeline"):
            with attnprobe.probe(pipe):
                pipe(image_embeddings=torch.zeros(1, 16, 4, 4), prompt="a dog", num_inference_steps=2)
    finally:
        for h in hooks:
            h.remove()
    assert not ran
    combined = StableCascadeCombinedPipeline(
        tokenizer=cascade.tokenizer, text_encoder=cascade.text_encoder, decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan, prior_prior=cascade.prior,
        prior_text_encoder=cascade.text_encoder, prior_tokenizer=cascade.tokenizer, prior_scheduler=cascade.scheduler)
    combined.set_progress_bar_config(disable=True)
    with pytest.raises(ProbeError, match="StableCascadeCombinedPipeline .* is Stable Cascade's decoder.*prior_pipe"):
        attnprobe.probe(combined).__enter__()
    with attnprobe.probe(combined.prior_pipe) as store:
        combined(prompt="a dog", num_inference_steps=2, prior_num_inference_steps=2, height=64, width=64,
                 output_type="pt")
    assert len(store.calls) == 2 and [(s.pass_label, s.text) for s in store.samples] == [("cond", "a dog")]
    assert store.token_indices(0, "dog") == [[2]]
    verdicts = {v.pipeline: v for v in pipeline_verdicts()}
    assert verdicts["StableCascadeDecoderPipeline"].verdict.startswith("refused: Stable Cascade's decoder")
    assert verdicts["StableCascadeCombinedPipeline"].family == "cascade-decoder"
    assert verdicts["StableCascadePriorPipeline"].verdict == "tested (tests/test_more_families.py)"



def test_a_study_of_the_cascade_prior_is_refused_up_front(tmp_path, capsys):
    """The prior makes image embeddings, not images to score and draw: the study says so in one line before it
    writes anything."""
    from attnprobe.study import cli

    code = cli.main(["study", "--model", "tiny-cascade-prior", "--out", str(tmp_path / "o"), "--seeds", "0",
                     "--steps", "2", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("attnprobe: error: StableCascadePriorPipeline returns image_embeddings")
    assert "not images" in err and "\n" not in err and not (tmp_path / "o").exists()


def test_hunyuanimage_words_past_its_maximum_length_are_not_labelled(hunyuanimage):
    """The pipeline keeps 32 Qwen positions (the real one 1000) and encodes its negative prompt in a second
    encode_prompt: the ids of the first are what label the keys, so a mention past the cut is refused, not put on a
    masked key."""
    from attnprobe.errors import ConceptError

    prompt = "a photo of a " + "big " * 40 + "dog"
    with attnprobe.probe(hunyuanimage) as store:
        hunyuanimage(prompt=[prompt], num_inference_steps=1, height=64, width=64, output_type="latent")
    assert store.token_kinds(0)[:32] == ["word"] * 32 and set(store.token_kinds(0)[32:]) == {"pad"}
    with pytest.raises(ConceptError, match="past the maximum length"):
        store.token_indices(0, "dog")


@torch.no_grad()
def test_cogview3_text_then_image_in_one_softmax_against_a_float64_reference():
    """CogView3-Plus: the processor joins [text; image] and normalises q and k per head (LayerNorm), no rotary
    embedding; T5's positions unmasked; the batch is [uncond, cond]; a 64 × 96 px image is a 4 × 6 grid."""
    pipe = tiny_pipeline("cogview3")
    prompts = ["a picture of dog", "a brown dog"]
    kwargs = dict(num_inference_steps=2, height=64, width=96, output_type="latent", max_sequence_length=16)
    plain, store, seen, sites = _recorded(pipe, prompts, "all", **kwargs)
    assert [s.kind for s in sites] == ["single", "single"]
    assert [(s.pass_label, s.prompt_index) for s in store.samples] == [
        ("uncond", 0), ("uncond", 1), ("cond", 0), ("cond", 1)]
    assert store.token_indices(2, "dog") == [[3]] and store.token_indices(3, "dog") == [[2]]
    for site in sites:
        a = copy.deepcopy(pipe.transformer.get_submodule(site.name)).double()
        assert store[site.name].shape[3:] == (4, 6, 16)
        for call in range(len(store.calls)):
            inputs = seen.seen[site.name][store.calls[call].index]
            text = inputs["encoder_hidden_states"].double()
            x = torch.cat([text, inputs["hidden_states"].double()], dim=1)
            q = a.norm_q(a.to_q(x).unflatten(-1, (a.heads, -1)).transpose(1, 2))
            k = a.norm_k(a.to_k(x).unflatten(-1, (a.heads, -1)).transpose(1, 2))
            probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
            n = text.shape[1]
            want = probs[[s.row for s in store.samples]][:, :, n:, :n]
            got = store[site.name][call].flatten(2, 3).double()
            assert (got - want).abs().max() <= 1e-6, (site.name, call)


def test_zimage_uncond_calls_kept_after_the_cut_warn_that_they_hold_only_nan(zimage):
    """``passes="uncond", calls=[3]`` after ``cfg_truncation`` cut the unconditional rows: the kept call has no row of
    the pass, so the store holds only NaN, and says so."""
    kwargs = dict(num_inference_steps=4, height=64, width=64, output_type="latent", max_sequence_length=32,
                  cfg_truncation=0.2)
    with pytest.warns(attnprobe.AttnprobeWarning, match="holds only NaN"):
        with attnprobe.probe(zimage, passes="uncond", calls=[3]) as store:
            zimage(prompt="a dog", generator=torch.Generator().manual_seed(0), **kwargs)
    assert store[store.sites[0].name].float().isnan().all()


@torch.no_grad()
def test_lumina_next_cross_attention_with_grouped_heads_against_a_float64_reference():
    """Lumina-Next: ``attn2`` queries rotated (complex RoPE), q and k normed, one key head for two query heads, the
    padding mask; the prompts' rows come first."""
    pipe = tiny_pipeline("lumina-next")
    prompts = ["a picture of dog", "a brown dog"]
    kwargs = dict(num_inference_steps=2, height=64, width=96, output_type="latent", max_sequence_length=16,
                  clean_caption=False)
    plain, store, seen, sites = _recorded(pipe, prompts, "all", **kwargs)
    assert [s.name for s in sites] == ["layers.0.attn2", "layers.1.attn2"]
    assert [(s.pass_label, s.prompt_index) for s in store.samples] == [
        ("cond", 0), ("cond", 1), ("uncond", 0), ("uncond", 1)]
    assert store.token_indices(0, "dog") == [[4]] and store.token_indices(1, "dog") == [[3]]
    for site in sites:
        a = copy.deepcopy(pipe.transformer.get_submodule(site.name)).double()
        for call in range(len(store.calls)):
            inputs = seen.seen[site.name][store.calls[call].index]
            h, e = inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double()
            q = a.norm_q(a.to_q(h)).unflatten(-1, (a.heads, -1))
            k = a.norm_k(a.to_k(e)).unflatten(-1, (-1, q.shape[-1]))
            freqs = inputs["query_rotary_emb"]
            z = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2).contiguous())
            q = torch.view_as_real(z * freqs.to(torch.complex128).reshape(1, z.shape[1], 1, -1)).flatten(-2)
            k = k.repeat_interleave(a.heads // k.shape[2], dim=2)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
            logits = logits.masked_fill(~inputs["attention_mask"].bool()[:, None, None, :], float("-inf"))
            want = logits.softmax(-1)[[s.row for s in store.samples]]
            got = store[site.name][call].flatten(2, 3).double()
            assert got.shape[2:] == want.shape[2:] and (got - want).abs().max() <= 1e-6, (site.name, call)


@torch.no_grad()
def _check_text_first_rope(pipe, store, sites, seen, n_text):
    """Flux-like attention (Bria, Ovis-Image): ``[text; image]`` q and k, the text's through the added projections at
    joint sites, normed per head, RoPE (the model's real tables) on every position; the float64 softmax over all keys
    at the image queries and text keys equals the store's map."""
    for site in sites:
        a = copy.deepcopy(pipe.transformer.get_submodule(site.name)).double()
        for call in range(len(store.calls)):
            inputs = seen.seen[site.name][store.calls[call].index]
            h = inputs["hidden_states"].double()
            heads = lambda x: x.unflatten(-1, (a.heads, -1))  # noqa: E731
            q, k = a.norm_q(heads(a.to_q(h))), a.norm_k(heads(a.to_k(h)))
            if site.kind == "joint":
                e = inputs["encoder_hidden_states"].double()
                q = torch.cat([a.norm_added_q(heads(a.add_q_proj(e))), q], dim=1)
                k = torch.cat([a.norm_added_k(heads(a.add_k_proj(e))), k], dim=1)
            cos, sin = inputs["image_rotary_emb"]
            q, k = _rotate_image(q, cos, sin, q.shape[1]), _rotate_image(k, cos, sin, k.shape[1])
            probs = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
            want = probs[[s.row for s in store.samples]][:, :, n_text:, :n_text]
            got = store[site.name][call].flatten(2, 3).double()
            assert (got - want).abs().max() <= 1e-6, (site.name, call)


@torch.no_grad()
def test_bria_one_prompt_against_a_float64_reference_and_several_refused():
    """Bria: Flux's [text; image] joint and single-stream attention with RoPE on both, T5 positions of the prompt
    then the zero keys the pipeline added; it encodes each prompt in an encoder call of its own, so several prompts
    in one call are refused before anything is labelled."""
    pipe = tiny_pipeline("bria")
    kwargs = dict(num_inference_steps=2, height=64, width=96, output_type="latent", max_sequence_length=16)
    plain, store, seen, sites = _recorded(pipe, "a picture of dog", "all", **kwargs)
    assert [s.kind for s in sites] == ["joint", "single", "single"]
    assert [(s.pass_label, s.text) for s in store.samples] == [("uncond", None), ("cond", "a picture of dog")]
    assert store.token_indices(1, "dog") == [[3]] and store.token_kinds(1)[4:6] == ["end", "unknown"]
    assert store.meta["image_size"] == [64, 96]  # its VAE's 8× (its vae_scale_factor, 16, counts the 2×2 packing)
    n_text = 16
    _check_text_first_rope(pipe, store, sites, seen, n_text)
    assert store[sites[0].name].shape[3:] == (4, 6, n_text)
    with pytest.raises(ProbeError, match="encodes each of its 2 prompts"):
        with attnprobe.probe(pipe):
            pipe(prompt=["a picture of dog", "a brown dog"], **kwargs)


@torch.no_grad()
def test_ovis_template_keys_against_a_float64_reference():
    """Ovis-Image: the keys start where the user turn's system prompt ends (``user_prompt_begin_id``): the words, the
    template's end, zeroed padding; [text; image] with RoPE on both; guidance as separate calls (cond recorded)."""
    pipe = tiny_pipeline("ovis")
    prompts = ["a picture of dog", "a brown dog"]
    kwargs = dict(num_inference_steps=2, height=64, width=96, output_type="latent", max_sequence_length=16)
    plain, store, seen, sites = _recorded(pipe, prompts, "cond", **kwargs)
    assert [c.layout for c in store.calls] == [("cond", "cond")] * 2
    assert store.token_indices(0, "dog") == [[3]] and store.token_indices(1, "dog") == [[2]]
    assert store.token_kinds(0)[4] == "template" and store.token_kinds(0)[-1] == "pad"
    n_text = 16
    _check_text_first_rope(pipe, store, sites, seen, n_text)
