"""Interventions (attnprobe.interventions: configs and apply) on the tiny pipelines: the edited attention equals an
independent float64 recompute (maps and site outputs, any processor), windows, the conditioning edit touches only
the concept's positions, every intervention restores the pipeline, and bad input fails before generating."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import attnprobe
from attnprobe import (
    AttentionEdit,
    ConceptError,
    ConditioningEdit,
    InterventionError,
    NegativePrompt,
    SafeLatentDiffusion,
    intervene,
    parse_interventions,
    probe,
)
from attnprobe.interventions import INTERVENTIONS
from attnprobe.testing import clip_tokenizer
from attnprobe.text.tokens import find_concept, token_layout

PROMPT = "a picture of Van Gogh"
CONCEPT = "Van Gogh"
FIRST = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"
FAST = dict(height=64, width=64, num_inference_steps=2, output_type="latent")


def positions(prompt=PROMPT, concept=CONCEPT):
    return sorted({p for occ in find_concept(token_layout(clip_tokenizer(), prompt), concept) for p in occ})


def sites(pipe):
    return [s.name for s in attnprobe.list_sites(pipe)]


def gen(target, seed=0, **kw):
    """Call a pipeline or an Intervened with the FAST settings and a seeded generator."""
    options = dict(FAST, generator=torch.Generator().manual_seed(seed))
    options.update(kw)
    return target(**options) if isinstance(target, attnprobe.Intervened) else target(PROMPT, **options)


class SiteIO:
    """Our own forward hooks: each site call's hidden states, text states and output (the module's result)."""

    def __init__(self, denoiser, names):
        self.modules = {n: denoiser.get_submodule(n) for n in names}
        self.calls = {n: [] for n in names}

    def __enter__(self):
        self.handles = [m.register_forward_hook(partial(self._keep, n), with_kwargs=True)
                        for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _keep(self, name, module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.calls[name].append((hidden.detach().clone(), kwargs["encoder_hidden_states"].detach().clone(),
                                 output.detach().clone()))

    @torch.no_grad()
    def reference(self, name, call, bias=None, weights=None):
        """float64 ``softmax(q·kᵀ·scale + bias)`` ``[batch, head, query, token]`` from the raw projections
        (never the mask the site got), and the site output ``to_out((p · weights) @ v)`` from it."""
        attn = self.modules[name]
        hidden, states, _ = self.calls[name][call]
        proj = lambda layer, x: torch.nn.functional.linear(x.double(), layer.weight.double(),  # noqa: E731
                                                           None if layer.bias is None else layer.bias.double())
        q, k, v = proj(attn.to_q, hidden), proj(attn.to_k, states), proj(attn.to_v, states)
        b, heads = q.shape[0], attn.heads
        q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) * attn.scale
        if bias is not None:
            logits = logits + bias
        p = logits.softmax(dim=-1)
        weighted = p if weights is None else p * weights
        out = (weighted @ v).transpose(1, 2).reshape(b, -1, heads * v.shape[-1])
        return p, proj(attn.to_out[0], out)


def cond_bias(batch, n_keys, pos, value, cond_rows=(1,)):
    """The edit expected on the conditional rows: ``value`` at the concept's keys, 0 elsewhere: [batch, 1, 1, token]."""
    bias = torch.zeros(batch, 1, 1, n_keys, dtype=torch.float64)
    for row in cond_rows:
        bias[row, ..., pos] = value
    return bias


# ------------------------------------------------------------------ attention edit: maps and outputs
@pytest.mark.parametrize("processor", ["sdpa", "classic"])
def test_zeroing_on_all_sites_gives_zero_mass_and_renormalises_the_rest(sd_pipe, processor, processors_of):
    saved = sd_pipe.unet.attn_processors
    if processor == "classic":
        sd_pipe.unet.set_attn_processor(AttnProcessor())
    pos, names = positions(), sites(sd_pipe)
    try:
        with SiteIO(sd_pipe.unet, names) as io, intervene(sd_pipe, AttentionEdit(0.0), PROMPT, concept=CONCEPT) as run:
            with probe(run.pipe, passes="all", dtype=torch.float32) as store:
                gen(run)
    finally:
        sd_pipe.unet.set_attn_processor(saved)
    uncond, cond = (s.index for s in store.samples)
    for name in names:
        maps = store[name]  # [call, sample, head, qh, qw, token]
        assert maps[:, cond, ..., pos].abs().max().item() == 0.0, name  # exactly 0 on the edited sites
        for call in range(maps.shape[0]):
            p, out = io.reference(name, call)  # unedited softmax [batch, head, query, token]
            want = p.clone()
            want[1, ..., pos] = 0
            want[1] = want[1] / (1 - p[1, ..., pos].sum(-1, keepdim=True))  # the others, renormalised
            got = maps[call].double().flatten(2, 3)  # [sample, head, query, token]
            assert (got[cond] - want[1]).abs().max() < 1e-6 and (got[uncond] - want[0]).abs().max() < 1e-6
            if name in (FIRST, MID):  # what the installed processor computed: the edited attention
                _, out = io.reference(name, call, bias=cond_bias(2, 77, pos, float("-inf")))
                assert (io.calls[name][call][2].double() - out).abs().max() < 1e-5, (name, call)
    assert store.meta["interventions"][0]["intervention"] == "AttentionEdit(scale=0.0)"


def test_scaling_with_an_existing_mask_adds_both(sd_pipe, attn_inputs):
    """A direct denoiser call with ``encoder_attention_mask``: the edit's log(scale) joins the mask the UNet passes."""
    unet, pos = sd_pipe.unet, positions()
    torch.manual_seed(0)
    latents, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    keep = torch.zeros(2, 77)
    keep[:, :9] = 1
    sd_pipe._guidance_scale = 7.5  # the pipeline's flag, as a call sets it: rows [uncond, cond]
    with SiteIO(unet, [FIRST]) as io, intervene(sd_pipe, AttentionEdit(0.25, sites=FIRST), PROMPT, concept=CONCEPT):
        with probe(unet, sites=FIRST, passes="all", dtype=torch.float32) as store:
            unet(latents, torch.tensor(10), encoder_hidden_states=states, encoder_attention_mask=keep)
    unet_bias = ((1 - keep) * -10000.0).double().reshape(2, 1, 1, 77)
    p, out = io.reference(FIRST, 0, bias=unet_bias + cond_bias(2, 77, pos, torch.log(torch.tensor(0.25)).item()))
    assert (store[FIRST][0].double().flatten(2, 3) - p).abs().max() < 1e-6
    assert (io.calls[FIRST][0][2].double() - out).abs().max() < 1e-5


def test_unrenormalised_scaling_scales_the_concepts_weights(sd_pipe):
    pos = positions()
    with SiteIO(sd_pipe.unet, [FIRST, MID]) as io:
        with intervene(sd_pipe, AttentionEdit(0.5, renormalize=False, sites=[FIRST]), PROMPT, concept=CONCEPT) as run:
            with probe(run.pipe, dtype=torch.float32) as store:
                gen(run)
    weights = cond_bias(2, 77, pos, 0.5) + 1
    weights[1, ..., pos] = 0.5
    for call in range(2):
        p, out = io.reference(FIRST, call, weights=weights)  # Prompt-to-Prompt: p · w, rows no longer sum to 1
        assert (store[FIRST][call, 0].double().flatten(1, 2) - p[1]).abs().max() < 1e-6  # recorded: the softmax
        assert (io.calls[FIRST][call][2].double() - out).abs().max() < 1e-5
        _, plain = io.reference(MID, call)  # a site outside the edit is untouched
        assert (io.calls[MID][call][2].double() - plain).abs().max() < 1e-5
    factors = run.mass_factors(store, CONCEPT)  # [call, site]: 0.5 at the edited site
    first = [s.name for s in store.sites].index(FIRST)
    assert factors[:, first].tolist() == [0.5, 0.5] and factors.sum().item() == 0.5 * 2 + (len(store.sites) - 1) * 2
    assert "before scaling" in store.meta["interventions"][0]["maps"]


# ------------------------------------------------------------------ windows
def test_a_window_changes_maps_from_its_first_call_only(sd_pipe):
    five = dict(num_inference_steps=5)
    with probe(sd_pipe, dtype=torch.float32) as plain:
        before = gen(sd_pipe, **five).images
    with intervene(sd_pipe, AttentionEdit(0.0, calls=(2, 3)), PROMPT, concept=CONCEPT) as run:
        with probe(run.pipe, dtype=torch.float32) as edited:
            gen(run, **five)
    by_time = attnprobe.trajectory(edited, CONCEPT).tolist()
    ref = attnprobe.trajectory(plain, CONCEPT).tolist()
    for name in plain:
        assert torch.equal(plain[name][:2], edited[name][:2])  # calls 0, 1: bit-identical
    assert by_time[2] == by_time[3] == 0.0 and by_time[4] > 0 and ref[2] > 0
    assert not torch.equal(plain[FIRST][4], edited[FIRST][4])  # after the window: other latents, other maps
    # the same window by timesteps
    t = [c.timestep for c in plain.calls]
    with intervene(sd_pipe, AttentionEdit(0.0, timesteps=(t[2], t[3])), PROMPT, concept=CONCEPT) as run:
        with probe(run.pipe, dtype=torch.float32) as by_steps:
            gen(run, **five)
    assert all(torch.equal(edited[n], by_steps[n]) for n in edited)
    # scale 1 on calls 0-3: nothing changes, bit for bit
    with intervene(sd_pipe, AttentionEdit(1.0, calls=(0, 3)), PROMPT, concept=CONCEPT) as run:
        with probe(run.pipe, dtype=torch.float32) as same:
            after = gen(run, **five).images
    assert torch.equal(before, after) and all(torch.equal(plain[n], same[n]) for n in plain)


def test_a_window_outside_the_run_is_refused_before_generating(sd_pipe):
    calls = []
    handle = sd_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InterventionError, match="2 steps with DDIMScheduler make 2 denoiser calls, 0-1"):
            with intervene(sd_pipe, AttentionEdit(0.0, calls=(1, 5)), PROMPT, concept=CONCEPT, steps=2):
                pass
        with intervene(sd_pipe, AttentionEdit(0.0, timesteps=(5, 2)), PROMPT, concept=CONCEPT) as run:
            with pytest.raises(InterventionError, match="no denoiser call of the run falls in the window"):
                gen(run)
    finally:
        handle.remove()
    assert calls == []


# ------------------------------------------------------------------ conditioning edit
@pytest.mark.parametrize("mode", ["padding", "word", "project"])
def test_conditioning_edit_changes_only_the_concepts_positions(sd_pipe, mode):
    pos = positions()
    with SiteIO(sd_pipe.unet, [FIRST]) as plain:
        gen(sd_pipe, num_inference_steps=1)
    with SiteIO(sd_pipe.unet, [FIRST]) as io:
        with intervene(sd_pipe, ConditioningEdit(mode), PROMPT, concept=CONCEPT) as run:
            gen(run, num_inference_steps=1)
    before, after = plain.calls[FIRST][0][1], io.calls[FIRST][0][1]  # [batch, token, hidden]: uncond, cond
    changed = (before != after).any(-1).nonzero().tolist()
    assert sorted(changed) == [[1, p] for p in pos]
    tok, enc = clip_tokenizer(), sd_pipe.text_encoder
    with torch.no_grad():
        if mode == "project":  # v − (v·u)u, u: the concept encoded alone, its tokens' mean, unit length
            ids = tok(CONCEPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
            u = enc(ids)[0][0, positions(CONCEPT, CONCEPT)].double().mean(0)
            u = u / u.norm()
            v = before[1, pos].double()
            assert (after[1, pos].double() - (v - (v @ u)[:, None] * u)).abs().max() < 1e-5
            assert (after[1, pos].double() @ u).abs().max() < 1e-5
        else:  # the prompt re-encoded with the padding id (or "thing") at the concept's positions
            ids = tok(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
            ids[0, pos] = tok.pad_token_id if mode == "padding" else tok("thing", add_special_tokens=False).input_ids[0]
            assert torch.equal(after[1, pos], enc(ids)[0][0, pos])


# ------------------------------------------------------------------ every intervention restores the pipeline
@pytest.mark.parametrize("spec", [*INTERVENTIONS, "zero-attention:calls=0-0+pad-conditioning+negative-prompt+sld"])
def test_every_intervention_restores_the_pipeline(sd_pipe, spec, processors_of, assert_clean):
    before, procs, config = gen(sd_pipe).images, processors_of(sd_pipe), dict(sd_pipe.scheduler.config)
    ((_, items),) = parse_interventions({"row": spec}).items()
    with intervene(sd_pipe, items, PROMPT, concept=CONCEPT) as run:
        out = gen(run).images
    assert_clean(sd_pipe, procs)
    assert not hasattr(sd_pipe.unet, "_attnprobe_interventions")
    assert dict(sd_pipe.scheduler.config) == config
    assert torch.equal(gen(sd_pipe).images, before)
    if "sld" not in spec:  # SLD decodes (no latent output); the rest changed the latents
        assert not torch.equal(out, before)
    with pytest.raises(RuntimeError, match="boom"):  # an error inside the block restores too
        with intervene(sd_pipe, items, PROMPT, concept=CONCEPT):
            raise RuntimeError("boom")
    assert_clean(sd_pipe, procs)


def test_sdxl_edits_restore_and_sld_is_refused(sdxl_pipe, processors_of, assert_clean):
    before, procs = gen(sdxl_pipe).images, processors_of(sdxl_pipe)
    with intervene(sdxl_pipe, [AttentionEdit(0.0), ConditioningEdit()], PROMPT, concept=CONCEPT) as run:
        with probe(run.pipe, dtype=torch.float32) as store:
            gen(run)
    assert attnprobe.trajectory(store, CONCEPT).max().item() == 0.0
    assert_clean(sdxl_pipe, procs)
    assert torch.equal(gen(sdxl_pipe).images, before)
    with pytest.raises(InterventionError, match="second text encoder"):
        with intervene(sdxl_pipe, SafeLatentDiffusion(), PROMPT, concept=CONCEPT):
            pass


def test_half_precision_edits_stay_finite_and_restore(assert_clean):
    from attnprobe.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(dtype=torch.float16)  # the bias is made in the states' dtype, as SDPA requires
    before = gen(pipe, num_inference_steps=1).images
    edits = [AttentionEdit(0.0), AttentionEdit(0.5, renormalize=False, sites="up_blocks.*"), ConditioningEdit("project")]
    with intervene(pipe, edits, PROMPT, concept=CONCEPT) as run, probe(run.pipe) as store:
        out = gen(run, num_inference_steps=1).images
    assert torch.isfinite(out).all() and attnprobe.trajectory(store, CONCEPT).max().item() == 0.0
    assert_clean(pipe)
    assert torch.equal(gen(pipe, num_inference_steps=1).images, before)


def test_the_probe_records_the_edit_opened_either_side(sd_pipe):
    edit = AttentionEdit(0.5, sites="up_blocks.*")
    with intervene(sd_pipe, edit, PROMPT, concept=CONCEPT) as run, probe(run.pipe, dtype=torch.float32) as inside:
        gen(run)
    with probe(sd_pipe, dtype=torch.float32) as outside, intervene(sd_pipe, edit, PROMPT, concept=CONCEPT) as run:
        gen(run)
    assert all(torch.equal(inside[n], outside[n]) for n in inside)
    assert inside.meta["interventions"] == outside.meta["interventions"]
    assert inside.meta["interventions"][0] == {"intervention": "AttentionEdit(scale=0.5, sites='up_blocks.*')",
                                               "concept": CONCEPT, "maps": inside.meta["interventions"][0]["maps"]}
    with probe(sd_pipe) as plain:
        gen(sd_pipe)
    assert plain.meta["interventions"] == []


def test_negative_prompt_and_sld_rows(sd_pipe):
    with intervene(sd_pipe, NegativePrompt(), PROMPT, concept=CONCEPT) as run:
        with probe(run.pipe, passes="all", dtype=torch.float32) as store:
            gen(run)
    assert [(s.pass_label, s.text) for s in store.samples] == [("uncond", CONCEPT), ("cond", PROMPT)]
    with probe(sd_pipe, dtype=torch.float32) as plain:
        gen(sd_pipe, num_inference_steps=3)
    with intervene(sd_pipe, SafeLatentDiffusion(), PROMPT, concept=CONCEPT) as run:
        with probe(run.pipe, passes="all", dtype=torch.float32) as sld:
            gen(run, num_inference_steps=3)
    assert type(run.pipe).__name__ == "StableDiffusionPipelineSafe" and run.pipe.unet is sd_pipe.unet
    cond = run.conditional_sample(sld)
    # the batch [uncond, cond, safety concept] is labelled pass by pass, each with the text it encoded
    assert [(s.row, s.pass_label, s.text) for s in sld.samples] == [(0, "uncond", ""), (1, "cond", PROMPT),
                                                                    (2, "safety", CONCEPT)]
    assert cond == 1 and sld.token_indices(cond, CONCEPT) == plain.token_indices(0, CONCEPT)
    with intervene(sd_pipe, SafeLatentDiffusion(), PROMPT, concept=CONCEPT) as run:
        with probe(run.pipe, dtype=torch.float32) as cond_only:  # passes="cond": the conditional row only
            gen(run, num_inference_steps=3)
    assert [s.row for s in cond_only.samples] == [1] and run.conditional_sample(cond_only) == 0
    # call 0 has the same latents: the cond row's maps match the plain run's; the uncond row's do not
    assert (sld[FIRST][0, cond] - plain[FIRST][0, 0]).abs().max() < 1e-5
    assert (sld[FIRST][0, 0] - plain[FIRST][0, 0]).abs().max() > 1e-3


# ------------------------------------------------------------------ bad input
def test_bad_input_is_refused_before_generating(sd_pipe):
    with pytest.raises(InterventionError, match=r"unknown intervention 'zero'.*'zero-attention'"):
        parse_interventions("zero")
    with pytest.raises(InterventionError, match="option 'cals=0-3'"):
        parse_interventions("zero-attention:cals=0-3")
    with pytest.raises(InterventionError, match="not a range"):
        parse_interventions("zero-attention:calls=3")
    with pytest.raises(InterventionError, match="given twice"):
        parse_interventions("sld,sld")
    with pytest.raises(InterventionError, match="scale"):
        AttentionEdit(-1.0)
    with pytest.raises(InterventionError, match="mode"):
        ConditioningEdit("erase")
    with pytest.raises(ConceptError, match="concept 'cat' is not in the prompt"):
        with intervene(sd_pipe, AttentionEdit(0.0), PROMPT, concept="cat"):
            pass
    with pytest.raises(InterventionError, match="is not an intervention"):
        with intervene(sd_pipe, [3], PROMPT, concept=CONCEPT):
            pass
    with intervene(sd_pipe, "zero-attention:calls=0-0+negative-prompt", PROMPT, concept=CONCEPT) as run:
        assert run.interventions == [AttentionEdit(0.0, calls=(0, 0), concept=CONCEPT), NegativePrompt(concept=CONCEPT)]
    with pytest.raises(InterventionError, match="has no concept"):
        with intervene(sd_pipe, AttentionEdit(0.0), PROMPT):
            pass
    with pytest.raises(InterventionError, match="more than one NegativePrompt"):
        with intervene(sd_pipe, [NegativePrompt(), NegativePrompt("x {c}")], PROMPT, concept=CONCEPT):
            pass
    with intervene(sd_pipe, NegativePrompt(), PROMPT, concept=CONCEPT) as run:
        with pytest.raises(InterventionError, match="do not pass negative_prompt"):
            gen(run, negative_prompt="blurry")
    with intervene(sd_pipe, SafeLatentDiffusion(), PROMPT, concept=CONCEPT) as run:
        with pytest.raises(InterventionError, match="needs classifier-free guidance"):
            gen(run, guidance_scale=1.0)


def test_parse_composes_labels_and_options():
    rows = parse_interventions("zero-attention,early=zero-attention:calls=0-3:sites=up_blocks.*,"
                               "both=pad-conditioning+negative-prompt:template=blurry {c}")
    assert list(rows) == ["zero-attention", "early", "both"]
    assert rows["early"] == (AttentionEdit(0.0, sites="up_blocks.*", calls=(0, 3)),)
    assert rows["both"] == (ConditioningEdit(), NegativePrompt("blurry {c}"))
    assert repr(rows["both"][1]) == "NegativePrompt(template='blurry {c}')"
    assert parse_interventions({"mine": [AttentionEdit(0.5, renormalize=False)]})["mine"][0].renormalize is False
    assert parse_interventions(None) == {}
    assert parse_interventions([AttentionEdit(0.5), "sld"]) == {"AttentionEdit(scale=0.5)": (AttentionEdit(0.5),),
                                                               "sld": (SafeLatentDiffusion(),)}


@pytest.mark.parametrize("spec, match", [(",", "names no intervention"), ("", "names no intervention"),
                                         ("=zero-attention", "both parts"), ("early=", "both parts")])
def test_specs_that_name_nothing_are_refused(spec, match):
    from attnprobe import parse_interventions
    from attnprobe.errors import InterventionError

    with pytest.raises(InterventionError, match=match):
        parse_interventions(spec)


def test_bad_negative_prompt_template_and_non_config_are_refused_at_once():
    from attnprobe import NegativePrompt, intervene
    from attnprobe.errors import InterventionError
    from attnprobe.testing import tiny_sd_pipeline

    with pytest.raises(InterventionError, match=r"only \{c\}"):
        NegativePrompt("{x}")
    with pytest.raises(InterventionError, match="42 is not an intervention"):
        with intervene(tiny_sd_pipeline(), 42, "a picture of dog", concept="dog"):
            pass


def test_a_negative_prompt_works_on_every_family_and_edits_are_refused_there():
    """A negative prompt edits nothing of the denoiser, so it works on a transformer pipeline, batched (SD3: the
    store's own labels give the conditional sample) or run as separate calls (Qwen-Image's true CFG: the negative
    prompt reaches the uncond calls); attention and conditioning edits are refused there, naming the family."""
    from attnprobe.testing import tiny_pipeline

    sd3 = tiny_pipeline("sd3")
    run_kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="latent", max_sequence_length=16)
    with intervene(sd3, NegativePrompt("blurry {c}"), "a picture of dog", concept="dog") as run:
        with probe(run.pipe, passes="all") as store:
            run(**run_kwargs)
    cond = run.conditional_sample(store)
    assert store.samples[cond].pass_label == "cond" and store.samples[cond].text == "a picture of dog"
    assert [s.text for s in store.samples if s.pass_label == "uncond"] == ["blurry dog"]
    qwen = tiny_pipeline("qwen")
    with intervene(qwen, NegativePrompt(), "a picture of dog", concept="dog") as run:
        with probe(run.pipe, passes="uncond") as uncond:
            run(true_cfg_scale=4.0, **run_kwargs)
    assert [s.text for s in uncond.samples] == ["dog"] and len(uncond.calls) == 2
    with pytest.raises(InterventionError, match="other than negative-prompt.*'sd3' family.*use negative-prompt"):
        intervene(sd3, AttentionEdit(0.0), "a picture of dog", concept="dog").__enter__()
    deepfloyd = tiny_pipeline("if")  # no do_classifier_free_guidance property: edits refused, a negative prompt not
    with intervene(deepfloyd, NegativePrompt(), "a picture of dog", concept="dog") as run:
        with probe(run.pipe, passes="all") as store:
            run(num_inference_steps=1, height=32, width=32, output_type="pt", clean_caption=False)
    assert store.samples[run.conditional_sample(store)].pass_label == "cond"
    assert [s.text for s in store.samples if s.pass_label == "uncond"] == ["dog"]
