"""Attention and conditioning edits on the cross-attention transformer families (PixArt, Sana, Kandinsky 3,
Lumina-Next), each against a reference made with our own hooks: the concept's key positions from the ids the text
encoder read and the encoding the pipeline hands the denoiser, the conditional row from diffusers' batch recipe of
each pipeline, the values scaled at every cross-attention site's ``to_v``; and the families the edits do not cover
refused up front with the reason."""

from __future__ import annotations

import inspect

import pytest
import torch

import attnprobe
from attnprobe import AttentionEdit, ConditioningEdit, InterventionError, intervene, probe
from attnprobe.testing import tiny_pipeline

PROMPT = "a photo of a dog"
#: per family: the batch row of the conditional pass (diffusers: [uncond, cond]; Lumina-Next: [cond, uncond])
COND_ROW = {"pixart": 1, "sana": 1, "kandinsky3": 1, "lumina-next": 0}
RUN = dict(num_inference_steps=2, height=64, width=64, output_type="pt", guidance_scale=4.0)


@pytest.fixture(scope="module")
def pipes():
    return {}


def pipe_of(pipes, name):
    if name not in pipes:
        pipes[name] = tiny_pipeline(name)
    return pipes[name]


def generate(target, **kw):
    options = dict(RUN, generator=torch.Generator().manual_seed(0))
    pipe = target.pipe if isinstance(target, attnprobe.Intervened) else target
    parameters = inspect.signature(type(pipe).__call__).parameters
    # cleaning needs bs4 and ftfy; the size asked, not the resolution table's; fewer text keys for speed
    for key, value in (("clean_caption", False), ("use_resolution_binning", False), ("max_sequence_length", 16)):
        if key in parameters:
            options[key] = value
    options.update(kw)
    if isinstance(target, attnprobe.Intervened):
        return target(**options).images
    return target(**{"prompt": [PROMPT], **options}).images


def name_of(target):
    pipe = target.pipe if isinstance(target, attnprobe.Intervened) else target
    return {"PixArtAlphaPipeline": "pixart", "SanaPipeline": "sana", "Kandinsky3Pipeline": "kandinsky3",
            "LuminaPipeline": "lumina-next"}[type(pipe).__name__]


def key_positions(pipe, text, word="dog"):
    """The keys of ``word`` in a pipeline call's text keys for ``text``, and the conditional row's text states
    ``[token, hidden]``: from the ids the text encoder read in that call (its first encode: the prompt), moved as the
    pipeline moves them (Sana keeps the first position and the last n − 1)."""
    seen, states = [], []
    encoder = pipe.text_encoder.register_forward_pre_hook(
        lambda m, a, k: seen.append((k.get("input_ids") if "input_ids" in k else a[0])[0].tolist()), with_kwargs=True)
    denoiser = (getattr(pipe, "transformer", None) or pipe.unet).register_forward_pre_hook(
        lambda m, a, k: states.append(k["encoder_hidden_states"]), with_kwargs=True)
    try:
        generate(pipe, prompt=[text], num_inference_steps=1, output_type="latent")
    finally:
        encoder.remove()
        denoiser.remove()
    ids, n_keys = seen[0], states[0].shape[1]
    tokens = [t.replace("▁", "").replace("Ġ", "").lower() for t in pipe.tokenizer.convert_ids_to_tokens(ids)]
    found = [i for i, t in enumerate(tokens) if t == word]
    assert found, (tokens, word)
    shift = len(ids) - n_keys if type(pipe).__name__ == "SanaPipeline" else 0
    return [p - shift for p in found], states[0][COND_ROW[name_of(pipe)]]


def cross_sites(pipe):
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    return [denoiser.get_submodule(s.name) for s in attnprobe.list_sites(pipe)]


@pytest.mark.parametrize("name", list(COND_ROW))
def test_scaled_values_equal_our_own_hooks_and_scale_one_is_bit_identical(pipes, name):
    """``AttentionEdit(renormalize=False)`` gives the image our own ``to_v`` hooks give (the conditional row's values
    at the concept's keys times the scale, at every cross-attention site); scale 1 changes nothing."""
    pipe = pipe_of(pipes, name)
    keys, _ = key_positions(pipe, PROMPT)
    row, scale = COND_ROW[name], 0.25

    def scaled(module, args, output):
        output = output.clone()
        output[row, keys] *= scale
        return output

    handles = [site.to_v.register_forward_hook(scaled) for site in cross_sites(pipe)]
    try:
        reference = generate(pipe)
    finally:
        for h in handles:
            h.remove()
    plain = generate(pipe)
    with intervene(pipe, AttentionEdit(scale, renormalize=False), PROMPT, concept="dog") as run:
        edited = generate(run)
    with intervene(pipe, AttentionEdit(1.0, renormalize=False), PROMPT, concept="dog") as run:
        unchanged = generate(run)
    assert torch.equal(edited, reference) and not torch.equal(edited, plain)
    assert torch.equal(unchanged, plain)


@pytest.mark.parametrize("name", ["pixart", "sana", "kandinsky3"])
def test_a_masked_concept_gets_no_attention_and_the_rest_renormalises(pipes, name):
    """``AttentionEdit(0)`` (renormalize) hands the sites a mask: the probe records 0 on the concept's keys of the
    conditional sample at every site and call, and at the first call's first site (inputs not yet edited) the other
    keys' weights are the unedited ones over 1 − the concept's."""
    pipe = pipe_of(pipes, name)
    keys, _ = key_positions(pipe, PROMPT)
    with probe(pipe, passes="cond", dtype=torch.float32) as plain:
        generate(pipe)
    with intervene(pipe, AttentionEdit(0.0), PROMPT, concept="dog") as run:
        with probe(run.pipe, passes="cond", dtype=torch.float32) as edited:
            generate(run)
    sites = [s.name for s in edited.sites]
    assert all(edited.maps(s)[..., keys].abs().max() == 0 for s in sites)  # every call, at every site
    first = plain.maps(sites[0], calls=0).double()
    expected = first.clone()
    expected[..., keys] = 0
    expected = expected / (1 - first[..., keys].sum(-1, keepdim=True))
    attended = torch.ones(first.shape[-1], dtype=torch.bool)
    if "text_mask" in plain.meta:  # padded keys: probability 0 either way
        attended = torch.tensor(plain.meta["text_mask"][0], dtype=torch.bool)
    assert torch.allclose(edited.maps(sites[0], calls=0).double()[..., attended], expected[..., attended], atol=1e-5)

@pytest.mark.parametrize("name", list(COND_ROW))
def test_the_projected_conditioning_equals_our_own_edit(pipes, name):
    """``ConditioningEdit(mode="project")`` gives the image our own denoiser pre-hook gives: the conditional row's
    vectors at the concept's keys minus their component along the unit mean of the concept encoded alone by the
    pipeline (SAFREE's projection)."""
    pipe = pipe_of(pipes, name)
    keys, _ = key_positions(pipe, PROMPT)
    alone, states = key_positions(pipe, "dog")
    u = states[alone].double().mean(0)  # the concept alone, as the pipeline hands it to the denoiser
    u = u / u.norm()
    row = COND_ROW[name]
    denoiser = getattr(pipe, "transformer", None) or pipe.unet

    def edit(module, args, kwargs):
        states = kwargs["encoder_hidden_states"].clone()
        v = states[row, keys].double()
        states[row, keys] = (v - (v @ u)[:, None] * u).to(states.dtype)
        return args, {**kwargs, "encoder_hidden_states": states}

    handle = denoiser.register_forward_pre_hook(edit, with_kwargs=True)
    try:
        reference = generate(pipe)
    finally:
        handle.remove()
    with intervene(pipe, ConditioningEdit(mode="project"), PROMPT, concept="dog") as run:
        edited = generate(run)
    assert torch.equal(edited, reference) and not torch.equal(edited, generate(pipe))


def test_what_the_edits_do_not_cover_is_refused_with_the_reason(pipes):
    """Another template than the one the concept's keys were found with is refused (Sana's instruction); Lumina-Next's
    processor takes the mask as a boolean (renormalize refused); an LLM encoder cannot be re-encoded
    with the concept's ids replaced (padding and word modes refused, project named); joint attention (SD3, DeepFloyd
    IF) and HunyuanDiT's two encoders refused naming why."""
    with intervene(pipe_of(pipes, "sana"), AttentionEdit(0.0), PROMPT, concept="dog") as run:
        with pytest.raises(InterventionError, match="complex_human_instruction= changes where the prompt's words are"):
            generate(run, complex_human_instruction=["Describe:"])
    lumina = pipe_of(pipes, "lumina-next")
    with pytest.raises(InterventionError, match="as a boolean.*renormalize=False"):
        intervene(lumina, AttentionEdit(0.0), PROMPT, concept="dog").__enter__()
    with pytest.raises(InterventionError, match="re-encodes the prompt.*Gemma2Model.*mode='project'"):
        intervene(lumina, ConditioningEdit(), PROMPT, concept="dog").__enter__()
    for name, why in (("sd3", "joint attention"), ("if", "joint attention"), ("hunyuandit", "two encoders")):
        with pytest.raises(InterventionError, match=f"'{name if name != 'if' else 'deepfloyd'}' family.*{why}"):
            intervene(tiny_pipeline(name), AttentionEdit(0.0, renormalize=False), PROMPT, concept="dog").__enter__()
