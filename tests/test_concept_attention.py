"""ConceptAttention (``attnprobe.concept_attention``): output-space concept maps of Flux and SD3 transformers.

The float64 reference never touches attnprobe's concept code: our own pre-forward hook on each double-stream block
keeps its inputs (image and prompt states, ``temb``, Flux's rotary table), the concepts are encoded with the
pipeline's T5 by hand, and both blocks of a two-block tiny Flux and of the tiny SD3 (whose last block has no text
output) are recomputed from their weights (adaLN, projections, RMS norms, rotary embedding, softmax attention, output
projection, feed-forward) in float64.
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch

import attnprobe
import attnprobe.capture.concepts as concepts_module
import attnprobe.capture.rows as rows_module
from attnprobe.capture.concepts import ConceptRecord, ConceptStream
from attnprobe.errors import (ArgumentError, AttnprobeError, AttnprobeWarning, ConceptError, ProbeError,
                              SampleLayoutError)
from attnprobe.testing import tiny_flux_pipeline, tiny_pipeline, tiny_sd_pipeline, tiny_sd3_pipeline

PROMPT = "a dog on grass"
CONCEPTS = ["dog", "grass", "sky"]
T5_LEN = 16
CALL = dict(num_inference_steps=2, height=64, width=96, max_sequence_length=T5_LEN, output_type="latent")


def _flux():
    """The tiny Flux with two double-stream blocks (the stream must carry from one block to the next)."""
    from diffusers import FluxTransformer2DModel

    pipe = tiny_flux_pipeline()
    torch.manual_seed(7)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    ).eval()
    return pipe


def _kontext(flux):
    """FluxKontextPipeline on the two-block tiny Flux: its input image's tokens follow the generated image's."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**{k: v for k, v in flux.components.items() if v is not None})


#: Kontext's input image, 32×64 px: its 2×4 tokens follow the generated 64×96 px image's 4×6 (other sizes on purpose)
KONTEXT = dict(image=torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(1)), _auto_resize=False,
               max_area=64 * 96)


@pytest.fixture(scope="module")
def pipes():
    flux = _flux()
    return {"flux": flux, "sd3": tiny_sd3_pipeline(), "sd3.5": tiny_sd3_pipeline(dual_attention=True),
            "kontext": _kontext(flux)}


@pytest.fixture(scope="module")
def pipe(pipes):
    return pipes["flux"]


def generate(pipe, prompt=PROMPT, **kwargs):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **{**CALL, **kwargs}).images


@pytest.fixture(scope="module")
def run(pipe):
    return _run(pipe)


@pytest.fixture(scope="module")
def sd3_run(pipes):
    return _run(pipes["sd3"])


@pytest.fixture(scope="module")
def sd35_run(pipes):
    return _run(pipes["sd3.5"])


@pytest.fixture(scope="module")
def kontext_run(pipes):
    return _run(pipes["kontext"], compare=False, **KONTEXT)


def _run(pipe, compare=True, **call):
    """One generation without and one with ConceptAttention, and each block's inputs (our hooks)."""
    plain = generate(pipe, **call)
    inputs: dict = {}

    def keep(i):
        def hook(module, args, kwargs):
            inputs.setdefault(i, []).append({k: v for k, v in kwargs.items() if isinstance(v, (torch.Tensor, tuple))})
        return hook

    hooks = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(pipe.transformer.transformer_blocks)]
    try:
        with attnprobe.concept_attention(pipe, CONCEPTS, compare=compare, max_sequence_length=T5_LEN) as result:
            probed = generate(pipe, **call)
    finally:
        for h in hooks:
            h.remove()
    return plain, probed, result, inputs


def test_images_are_bit_identical(pipe, run):
    plain, probed, result, _ = run
    assert torch.equal(plain, probed)
    with attnprobe.concept_attention(pipe, CONCEPTS, compare=False, max_sequence_length=T5_LEN) as quiet:
        again = generate(pipe)
    assert torch.equal(plain, again) and quiet.cross_attention is None
    # every hook is gone: the processors are the plain ones and a third run is identical too
    assert all(type(b.attn.processor).__name__ == "FluxAttnProcessor" for b in pipe.transformer.transformer_blocks)
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks


def test_shapes_and_sums(run):
    _, _, result, _ = run
    assert result.concepts == tuple(CONCEPTS)
    assert result.blocks == ("transformer_blocks.0", "transformer_blocks.1")
    assert tuple(result.block_maps.shape) == (2, 2, 1, 3, 4, 6)   # [call, block, sample, concept, qh, qw]
    assert tuple(result.maps.shape) == (2, 1, 3, 4, 6)
    torch.testing.assert_close(result.block_maps.sum(3), torch.ones(2, 2, 1, 4, 6))
    torch.testing.assert_close(result.maps.sum(2), torch.ones(2, 1, 4, 6))
    assert (result.maps >= 0).all() and len(result.timesteps) == 2
    torch.testing.assert_close(result.heatmap("grass"), result.maps[:, 0, 1].mean(0))
    with pytest.raises(IndexError, match=r"sample 1: the calls have 1 batch rows \(0..0\)"):
        result.heatmap("grass", sample=1)


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _linear(x, layer):
    return x @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0)


def _ada(x, norm, temb):
    """AdaLayerNormZero by hand: (normed x, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
    emb = _linear(torch.nn.functional.silu(temb), norm.linear)
    # AdaLayerNormZero: 6 chunks; SD3.5's SD35AdaLayerNormZeroX: 9, the last three for its image-only attn2
    shift, scale, gate, shift2, scale2, gate2 = emb.chunk(emb.shape[1] // x.shape[-1], dim=1)[:6]
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)
    return x * (1 + scale[:, None]) + shift[:, None], gate, shift2, scale2, gate2


def _rope(x, cos, sin):
    """Flux's real rotary embedding by hand on ``[sample, seq, head, d]`` (pairs (2i, 2i+1) rotated)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def _attend(q, k, v):
    """softmax(q·kᵀ/√d)·v over ``[sample, seq, head, d]``, heads concatenated: ``[sample, seq, head·d]``."""
    logits = torch.einsum("sqhd,skhd->shqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("shqk,skhd->sqhd", logits.softmax(-1), v).flatten(2)


def _norm(x, norm):
    return x if norm is None else _rms(x, norm.weight, norm.eps)


def _ada_continuous(x, norm, temb):
    """AdaLayerNormContinuous by hand (SD3's last block): scale, then shift."""
    scale, shift = _linear(torch.nn.functional.silu(temb), norm.linear).chunk(2, dim=1)
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def _reference(pipe, inputs, call: int, n_image: int | None = None):
    """Per block, the float64 ``softmax over concepts (o_x · o_cᵀ)`` ``[sample, concept, N]`` of one call (``n_image``:
    the first positions of the image sequence only; every image token is a key)."""
    sd3 = hasattr(pipe, "text_encoder_3")
    tok, t5 = (pipe.tokenizer_3, pipe.text_encoder_3) if sd3 else (pipe.tokenizer_2, pipe.text_encoder_2)
    ids = tok(CONCEPTS, padding="max_length", max_length=T5_LEN, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = t5(ids)[0][:, 0].double()                       # each concept alone, its first position
    tr = pipe.transformer
    stream = _linear(embeds, tr.context_embedder)[None]         # [1, concept, D]
    out = []
    for i, block in enumerate(tr.transformer_blocks):
        kw = inputs[i][call]
        x, text, temb = kw["hidden_states"].double(), kw["encoder_hidden_states"].double(), kw["temb"].double()
        attn, n_text, n_c = block.attn, text.shape[1], stream.shape[1]
        if sd3:  # no rotary embedding
            rot = {k: (lambda y: y) for k in ("image", "text", "concept")}
        else:
            cos, sin = (t.double() for t in kw["image_rotary_emb"])
            rot = {"image": lambda y: _rope(y, cos[n_text:], sin[n_text:]),
                   "text": lambda y: _rope(y, cos[:n_text], sin[:n_text]),   # the concepts sit at the text's id:
                   "concept": lambda y: _rope(y, cos[:1].expand(n_c, -1), sin[:1].expand(n_c, -1))}
        heads = lambda y: y.unflatten(-1, (attn.heads, -1))  # noqa: E731
        last = getattr(block, "context_pre_only", False)
        xn = _ada(x, block.norm1, temb)[0]
        tn = _ada_continuous(text, block.norm1_context, temb) if last else _ada(text, block.norm1_context, temb)[0]
        q_x = rot["image"](_norm(heads(_linear(xn, attn.to_q)), attn.norm_q))
        k_x = rot["image"](_norm(heads(_linear(xn, attn.to_k)), attn.norm_k))
        v_x = heads(_linear(xn, attn.to_v))
        k_t = rot["text"](_norm(heads(_linear(tn, attn.add_k_proj)), attn.norm_added_k))
        v_t = heads(_linear(tn, attn.add_v_proj))
        o_x = _attend(q_x, torch.cat([k_t, k_x], 1), torch.cat([v_t, v_x], 1))   # the model's image output
        c = stream.expand(x.shape[0], -1, -1)
        if last:
            cn = _ada_continuous(c, block.norm1_context, temb)
        else:
            cn, gate, shift2, scale2, gate2 = _ada(c, block.norm1_context, temb)
        q_c = rot["concept"](_norm(heads(_linear(cn, attn.add_q_proj)), attn.norm_added_q))
        k_c = rot["concept"](_norm(heads(_linear(cn, attn.add_k_proj)), attn.norm_added_k))
        v_c = heads(_linear(cn, attn.add_v_proj))
        o_c = _attend(q_c, torch.cat([k_c, k_x], 1), torch.cat([v_c, v_x], 1))   # never the prompt's keys
        out.append(torch.einsum("scd,snd->scn", o_c, o_x[:, :n_image]).softmax(1))
        if last:
            break
        c = c + gate[:, None] * _linear(o_c, attn.to_add_out)
        h = torch.nn.functional.layer_norm(c, c.shape[-1:], eps=1e-6) * (1 + scale2[:, None]) + shift2[:, None]
        ff = block.ff_context.net
        h = _linear(torch.nn.functional.gelu(_linear(h, ff[0].proj), approximate="tanh"), ff[2])
        stream = c + gate2[:, None] * h
    return torch.stack(out)                                      # [block, sample, concept, N]


@pytest.mark.parametrize("family", ["flux", "sd3", "sd3.5"])
def test_against_a_float64_reference(pipes, run, sd3_run, sd35_run, family):
    _, _, result, inputs = {"flux": run, "sd3": sd3_run, "sd3.5": sd35_run}[family]
    assert result.block_maps.shape[1] == 2
    for call in range(2):
        expect = _reference(pipes[family], inputs, call).float().unflatten(-1, (4, 6))
        torch.testing.assert_close(result.block_maps[call], expect, atol=2e-5, rtol=1e-4)


def test_flux_kontext_maps_the_generated_image(pipes, kontext_run):
    """FluxKontextPipeline appends its input image's tokens to the generated image's: the maps cover the generated
    image's 4×6 tokens (recomputed in float64, the input image's 2×4 tokens keys of every attention, the concepts'
    too, as the prompt's), the images stay bit-identical, and compare=True sets the probe's maps of the same grid
    beside them."""
    plain, probed, result, inputs = kontext_run
    assert torch.equal(plain, probed)
    n_image, n_input = (64 // 16) * (96 // 16), (32 // 16) * (64 // 16)  # 2×2 patches of the 8× VAE's latents
    assert inputs[0][0]["hidden_states"].shape[1] == n_image + n_input  # the reference sees both: Kontext is on
    assert tuple(result.maps.shape) == (2, 1, 3, 4, 6) and result.record.input_image_tokens == [n_input, n_input]
    for call in range(2):
        expect = _reference(pipes["kontext"], inputs, call, n_image).float().unflatten(-1, (4, 6))
        torch.testing.assert_close(result.block_maps[call], expect, atol=2e-5, rtol=1e-4)
    with attnprobe.concept_attention(pipes["kontext"], CONCEPTS, max_sequence_length=T5_LEN) as compared:
        generate(pipes["kontext"], num_inference_steps=1, **KONTEXT)
    assert tuple(compared.cross_attention.shape) == (1, 1, 3, 4, 6) and not compared.store.flat_sites
    assert not compared.cross_attention[:, :, :2].isnan().any()
    with attnprobe.concept_attention(pipes["kontext"], CONCEPTS, max_sequence_length=T5_LEN) as without:
        generate(pipes["kontext"], num_inference_steps=1)   # no input image: a plain Flux call, compared as usual
    assert without.record.input_image_tokens == [0] and not without.cross_attention[:, :, :2].isnan().any()


def test_sd3(pipes, sd3_run):
    """SD3: bit-identical images, its [uncond, cond] batch rows (labelled by the probe beside it), sums to 1; a
    concept not in the negative prompt has no cross-attention there."""
    plain, probed, result, _ = sd3_run
    assert torch.equal(plain, probed)
    assert tuple(result.maps.shape) == (2, 2, 3, 4, 6)
    assert [s.pass_label for s in result.store.samples] == ["uncond", "cond"]
    torch.testing.assert_close(result.maps.sum(2), torch.ones(2, 2, 4, 6))
    cross = result.cross_attention
    assert cross[:, 0].isnan().all() and cross[:, 1, 2].isnan().all() and not cross[:, 1, :2].isnan().any()



def test_sd35_dual_attention(sd35_run):
    """SD3.5's blocks add an image-only attn2 (and RMS norms on q and k): the concept stream reads attn alone."""
    plain, probed, result, _ = sd35_run
    assert torch.equal(plain, probed)
    torch.testing.assert_close(result.maps.sum(2), torch.ones(2, 2, 4, 6))


def test_the_prompt_as_concepts_follows_the_prompt_stream(pipe, monkeypatch):
    """Concepts that are exactly the prompt's T5 positions take the prompt's own path: the concept stream leaving a
    block equals the block's text output (so the stream's adaLN, attention, output projection and feed-forward are
    the model's own text stream)."""
    tr = pipe.transformer
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, max_sequence_length=T5_LEN)[0][0]
    texts, steps = [], []
    record = ConceptRecord(tuple(f"p{i}" for i in range(len(embeds))), ("transformer_blocks.0", "transformer_blocks.1"))
    stream = ConceptStream(tr, embeds, record)
    original = concepts_module.block_step

    def spy(*args):
        out = original(*args)
        steps.append(out[0])
        return out

    monkeypatch.setattr(concepts_module, "block_step", spy)
    hooks = [b.register_forward_hook(lambda m, a, out: texts.append(out[0])) for b in tr.transformer_blocks]
    try:
        stream.install()
        generate(pipe, num_inference_steps=1)
    finally:
        stream.remove()
        for h in hooks:
            h.remove()
    assert len(steps) == len(texts) == 2 and len(record.calls) == 1
    for got, expect in zip(steps, texts):
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_cross_attention_of_prompt_words(pipe, run):
    _, _, result, _ = run
    cross = result.cross_attention
    assert tuple(cross.shape) == (2, 1, 3, 4, 6)
    assert cross[:, :, 2].isnan().all()                       # "sky" is not in the prompt
    assert not cross[:, :, :2].isnan().any() and (cross[:, :, :2] > 0).all() and (cross[:, :, :2] < 1).all()
    # the same blocks probed separately, every head kept: the head mean of the word's share, then the block mean
    with attnprobe.probe(pipe, heads="keep", joint="renorm", passes="all", dtype=torch.float32,
                         sites=["transformer_blocks.*.attn"]) as store:
        generate(pipe)
    dog = store.token_indices(0, "dog")[0]
    expect = torch.stack([store.maps(s, tokens=dog)[:, 0].sum(-1).mean(1) for s in store.site_names]).mean(0)
    torch.testing.assert_close(cross[:, 0, 0], expect)


def test_a_concept_spelled_otherwise_in_the_prompt(pipe, run):
    """Concepts find prompt words case-insensitively (as store.token_indices does): "dog" sums the prompt's "Dog" tokens,
    while the concept map encodes "dog" as given and T5 reads "▁Dog" as another token; so a warning names the prompt's
    spelling. A concept spelled as in the prompt, or not in it, is not warned about."""
    from attnprobe.capture.concepts import encode_concepts

    assert pipe.tokenizer_2.tokenize("dog") != pipe.tokenizer_2.tokenize("Dog")   # T5 is case-sensitive here
    assert not torch.equal(*encode_concepts(pipe, ["dog", "Dog"], T5_LEN)[0])     # so are the concept tokens
    prompt = "a Dog on grass, a DOG"
    with attnprobe.concept_attention(pipe, CONCEPTS, max_sequence_length=T5_LEN) as result:
        generate(pipe, prompt, num_inference_steps=1)
    with pytest.warns(AttnprobeWarning) as caught:
        cross = result.cross_attention
    assert [str(w.message) for w in caught] == [
        "concept_attention: cross_attention of the concept 'dog' sums the prompt's 'Dog' (samples [0]); 'DOG' (samples "
        "[0]) (concepts match prompt words case-insensitively), but its concept map encodes 'dog' as given, and T5 is "
        "case-sensitive (other tokens): pass the concept as the prompt spells it for both to read the same word"]
    # both spellings' T5 tokens, by position (the tokenizer's own pieces, not a word lookup): the head, site, block mean
    pieces = pipe.tokenizer_2.tokenize(prompt)
    assert pieces == ["▁a", "▁Dog", "▁on", "▁grass", ",", "▁a", "▁D", "O", "G"]
    store = result.store
    expect = torch.stack([store.maps(s, tokens=[1, 6, 7, 8]).float().sum(-1).mean(2)[:, 0] for s in store.site_names])
    torch.testing.assert_close(cross[:, 0, 0], expect.mean(0))
    assert cross[:, 0, 2].isnan().all()                                          # "sky": not in the prompt
    _, _, quiet, _ = run                                                         # "dog" in "a dog on grass"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.cross_attention


def test_beside_a_probe_of_ones_own(pipe):
    """The concepts encoded when concept_attention opens are not taken for a prompt by a probe already open."""
    with attnprobe.probe(pipe, heads="mean") as alone:
        generate(pipe, num_inference_steps=1)
    with attnprobe.probe(pipe, heads="mean") as store:
        with attnprobe.concept_attention(pipe, ["cat", "sky"], max_sequence_length=T5_LEN) as result:
            generate(pipe, num_inference_steps=1)
    assert [s.text for s in store.samples] == [PROMPT] and store.token_indices(0, "dog") == [[1]]
    for site in store.site_names:
        assert torch.equal(store[site], alone[site])
    assert result.cross_attention.isnan().all() and tuple(result.maps.shape) == (1, 1, 2, 4, 6)


def test_chosen_blocks(pipe):
    with attnprobe.concept_attention(pipe, CONCEPTS, blocks=[1], compare=False, max_sequence_length=T5_LEN) as one:
        generate(pipe, num_inference_steps=1)
    with attnprobe.concept_attention(pipe, CONCEPTS, compare=False, max_sequence_length=T5_LEN) as both:
        generate(pipe, num_inference_steps=1)
    assert one.blocks == ("transformer_blocks.1",)
    torch.testing.assert_close(one.block_maps[:, 0], both.block_maps[:, 1])
    with pytest.raises(ArgumentError, match=r"not a double-stream block; there are 2 \(indices 0..1"):
        with attnprobe.concept_attention(pipe, CONCEPTS, blocks=[5]):
            pass


@pytest.mark.parametrize("concepts, error, match", [
    ([], ArgumentError, r"non-empty list of words.*got \[\]"),
    ("dog", ArgumentError, r"non-empty list of words.*got 'dog'"),
    (["dog", ""], ArgumentError, r"non-empty strings; got \[''\]"),
    (["dog", "dog"], ArgumentError, r"\['dog'\] are listed more than once"),
    (["dog", "😀"], ConceptError, r"concept '😀': .* cannot encode it \(pieces \['▁', '<unk>', '</s>'\]\)"),
])
def test_bad_concepts(pipe, concepts, error, match):
    with pytest.raises(error, match=match):
        with attnprobe.concept_attention(pipe, concepts):
            pass


def test_unsupported_pipelines_are_refused():
    for build, name in ((tiny_sd_pipeline, "UNet2DConditionModel"), (partial(tiny_pipeline, "pixart"), "PixArtTransformer2DModel")):
        with pytest.raises(ProbeError, match=rf"got {name} .*Supported: Flux \(FluxTransformer2DModel.*and SD3"):
            with attnprobe.concept_attention(build(), ["dog"]):
                pass
    assert issubclass(ProbeError, AttnprobeError)


def test_the_pipelines_default_length(pipe):
    """Without max_sequence_length the concepts are padded as the pipeline's call pads a prompt by default."""
    from attnprobe.capture.concepts import encode_concepts

    with torch.no_grad():
        padded = pipe.encode_prompt(prompt=["sky"], prompt_2=None, max_sequence_length=512)[0][:, 0]
    torch.testing.assert_close(encode_concepts(pipe, ["sky"])[0], padded)
    with pytest.raises(ArgumentError, match="max_sequence_length must be an int from 1 .*got 0"):
        encode_concepts(pipe, ["sky"], 0)


def test_no_call_recorded(pipe):
    with attnprobe.concept_attention(pipe, ["dog"], compare=False) as result:
        pass
    with pytest.raises(ProbeError, match="recorded no denoiser call"):
        result.maps
    with pytest.raises(ArgumentError, match=r"'cat' was not measured; the concepts are \['dog'\]"):
        result.heatmap("cat")


def test_a_planted_segmentation_is_recovered():
    """A known answer: one SD3 block whose image and text streams share weights and whose attention picks out
    identical tokens (q = k = 3·LayerNorm(x), v = LayerNorm(x), no modulation). The image's left half is the "dog"
    vector, its right half the "grass" vector, the prompt is other vectors; then the image's attention outputs are the
    dog or grass vector, so are those of the concepts "dog" and "grass", and ConceptAttention must say dog on the left,
    grass on the right, and never "sky" (a vector the image does not hold)."""
    from diffusers import SD3Transformer2DModel

    dim = 32
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=4, joint_attention_dim=dim, caption_projection_dim=dim,
                               pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).eval()
    block, eye = tr.transformer_blocks[0], torch.eye(dim)
    with torch.no_grad():
        for layer, scale in (("to_q", 3.0), ("to_k", 3.0), ("to_v", 1.0), ("add_q_proj", 3.0), ("add_k_proj", 3.0),
                             ("add_v_proj", 1.0)):
            getattr(block.attn, layer).weight.copy_(scale * eye)
            getattr(block.attn, layer).bias.zero_()
        for norm in (block.norm1, block.norm1_context):
            norm.linear.weight.zero_()
            norm.linear.bias.zero_()
        tr.context_embedder.weight.copy_(eye)
        tr.context_embedder.bias.zero_()
    torch.manual_seed(3)
    dog, grass, sky, *prompt = torch.randn(7, dim)
    image = torch.stack([dog if column < 2 else grass for row in range(4) for column in range(4)])[None]  # 4×4 grid

    def plant(module, args, kwargs):
        return args, {**kwargs, "hidden_states": image, "encoder_hidden_states": torch.stack(prompt)[None]}

    record = ConceptRecord(("dog", "grass", "sky"), ("transformer_blocks.0",))
    stream = ConceptStream(tr, torch.stack([dog, grass, sky]), record)
    handle = block.register_forward_pre_hook(plant, with_kwargs=True)
    try:
        stream.install()
        with torch.no_grad():
            tr(hidden_states=torch.zeros(1, 4, 8, 8), encoder_hidden_states=torch.zeros(1, 4, dim),
               pooled_projections=torch.zeros(1, 8), timestep=torch.tensor([500.0]))
    finally:
        stream.remove()
        handle.remove()
    maps = record.calls[0][0, 0]                                     # [concept, qh, qw]
    truth = torch.zeros(3, 4, 4)
    truth[0, :, :2], truth[1, :, 2:] = 1, 1
    torch.testing.assert_close(maps, truth, atol=1e-3, rtol=0)


def test_what_a_breaker_found(pipe):
    """Concepts that are the same tokens, or that a short max_sequence_length cuts to nothing, are refused; a call that
    raises leaves no timestep behind; a length unlike the call's is warned about; LoRA's scale passes; blocks of
    the wrong type and a bad sample say what they take; the result's repr stays short."""
    run = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=16, output_type="latent")
    with pytest.raises(ArgumentError, match="same tokens"):
        attnprobe.concept_attention(pipe, ["dog", "dog "], max_sequence_length=16).__enter__()
    with pytest.raises(ConceptError, match="max_sequence_length=1"):
        attnprobe.concept_attention(pipe, ["dog", "sky"], max_sequence_length=1).__enter__()
    with pytest.raises(ArgumentError, match="give None, a block index"):
        attnprobe.concept_attention(pipe, ["dog"], blocks=object(), max_sequence_length=16).__enter__()
    fired = []

    def boom(module, args):
        if not fired:
            fired.append(1)
            raise RuntimeError("boom")

    hook = pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(boom)
    try:
        with attnprobe.concept_attention(pipe, ["dog", "sky"], compare=False, max_sequence_length=16) as result:
            with pytest.raises(RuntimeError, match="boom"):
                pipe(prompt="a dog", **run)
            pipe(prompt="a dog", joint_attention_kwargs={"scale": 0.8}, **run)
    finally:
        hook.remove()
    assert len(result.timesteps) == len(result.record.calls) == 2
    with pytest.raises(ArgumentError, match="sample="):
        result.heatmap("dog", "0")
    assert len(repr(result)) < 200
    with pytest.warns(UserWarning, match="max_sequence_length=32"):
        with attnprobe.concept_attention(pipe, ["dog", "sky"], compare=False, max_sequence_length=32):
            pipe(prompt="a dog", **run)


def test_compare_says_what_to_do(pipe, monkeypatch):
    """An empty block exits as with compare=False; a second pipeline call with other prompts names compare=False.
    The probe's refusals are told apart by their class (NoDenoiserCallError, SampleLayoutError), not their words."""
    with attnprobe.concept_attention(pipe, ["dog"], max_sequence_length=16) as result:
        pass
    with pytest.raises(ProbeError, match="recorded no denoiser call"):
        result.maps
    run = dict(num_inference_steps=1, height=64, width=64, max_sequence_length=16, output_type="latent")
    with pytest.raises(SampleLayoutError, match="compare=False") as caught:
        with attnprobe.concept_attention(pipe, ["dog"], max_sequence_length=16):
            pipe(prompt="a dog", **run)
            pipe(prompt="a cat and a dog", **run)
    assert isinstance(caught.value.__cause__, SampleLayoutError)
    # reworded refusals are still told apart: the class decides, not the message
    monkeypatch.setattr(rows_module, "SampleLayoutError", lambda message: SampleLayoutError("reworded"))
    with pytest.raises(SampleLayoutError, match=r"which holds one pipeline call's prompts and size: reworded\. Pass"):
        with attnprobe.concept_attention(pipe, ["dog"], max_sequence_length=16):
            pipe(prompt="a dog", **run)
            pipe(prompt="a cat and a dog", **run)
    # another ProbeError of the probe is not taken for either
    monkeypatch.setattr(rows_module, "SampleLayoutError", lambda message: ProbeError("saw no denoiser call; open a new probe()"))
    with pytest.raises(ProbeError, match="^saw no denoiser call; open a new probe\(\)$"):
        with attnprobe.concept_attention(pipe, ["dog"], max_sequence_length=16):
            pipe(prompt="a dog", **run)
            pipe(prompt="a cat and a dog", **run)


def test_one_concept_is_warned_about(pipes):
    """A softmax over one concept is 1 everywhere: said, with what to pass."""
    with pytest.warns(attnprobe.AttnprobeWarning, match="one concept's map is 1 everywhere"):
        with attnprobe.concept_attention(pipes["flux"], ["dog"], compare=False, max_sequence_length=T5_LEN):
            generate(pipes["flux"], num_inference_steps=1)
