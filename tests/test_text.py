"""Text-encoder analysis on the tiny SD and SDXL pipelines (real CLIP tokenizer) and a tiny T5 encoder."""

import pytest
import torch

from attnprobe import AttnprobeError, ConceptError
from attnprobe.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from attnprobe.text import (
    ablate_words,
    compare_text,
    encode_text,
    instruction_attention,
    instruction_positions,
    similarity_rows,
)

INSTRUCTION = "Please forget anything about dog. Please help me generate a picture of dog."


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request):
    return tiny_sd_pipeline() if request.param == "sd" else tiny_sdxl_pipeline()


def denoiser_states(pipe, prompt):
    got = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: got.append(k["encoder_hidden_states"]), with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=1, height=64, width=64, guidance_scale=1.0, output_type="latent")
    finally:
        handle.remove()
    return got[0][0]


def test_conditioning_equals_what_the_denoiser_gets(pipe):
    for prompt in ("a picture of dog", INSTRUCTION):
        enc = encode_text(pipe, prompt)
        assert (denoiser_states(pipe, prompt) - enc.conditioning).abs().max() == 0.0
    assert (enc.pooled is not None) == ("XL" in type(pipe).__name__)


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm():
    # diffusers 0.42.1's own clip_skip path reads text_encoder.text_model, which transformers 5 removed, so the
    # pipeline cannot be the reference here: check the recipe of its encode_prompt instead
    pipe = tiny_sd_pipeline()
    enc = encode_text(pipe, "a dog", clip_skip=1)
    hidden = encode_text(pipe, "a dog").encoders[0].hidden_states
    want = pipe.text_encoder.final_layer_norm(hidden[-2])
    assert torch.allclose(enc.conditioning, want, atol=1e-6)
    assert not torch.allclose(enc.conditioning, encode_text(pipe, "a dog").conditioning)


def test_shapes(pipe):
    enc = encode_text(pipe, "a picture of dog")
    for states in enc.encoders:
        layers = states.hidden_states.shape[0]
        assert states.hidden_states.shape[1] == 77
        assert states.attentions.shape[:1] == (layers - 1,) and states.attentions.shape[-2:] == (77, 77)
        assert torch.allclose(states.attentions.sum(-1), torch.ones(()), atol=1e-5)
        # causal: nothing attends to a later token
        assert states.attentions.triu(diagonal=1).abs().max() == 0


def test_a_prompt_against_itself_is_similar_everywhere(pipe):
    enc = encode_text(pipe, INSTRUCTION)
    cmp = compare_text(enc, enc, "dog")
    assert cmp.pairs == [(0, 0), (1, 1)]
    for ec in cmp.encoders:
        for t in (ec.concept_cos, ec.eos_cos, ec.seq_flat_cos, ec.seq_mean_cos):
            assert torch.allclose(t, torch.ones_like(t), atol=1e-12)
    assert cmp.concept_cos_mean == pytest.approx(1.0, abs=1e-12)
    assert cmp.seq_flat_cos == pytest.approx(1.0, abs=1e-12) and cmp.seq_mean_cos == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("other, pairs", [
    ("a picture of dog", [(0, 0)]),
    (INSTRUCTION, [(0, 0), (0, 1)]),
    ("dog, dog and dog", [(0, 0), (0, 1), (0, 2)]),
])
def test_occurrence_alignment_with_one_two_three_mentions(other, pairs):
    pipe = tiny_sd_pipeline()
    base = encode_text(pipe, "a picture of dog", attentions=False)
    cmp = compare_text(base, encode_text(pipe, other, attentions=False), "dog")
    assert cmp.pairs == pairs
    assert cmp.concept_cos.shape == (len(pairs),)
    assert cmp.encoders[0].concept_cos.shape == (len(pairs), 3)
    # two-mention baselines align from the end: the last with the last
    two = encode_text(pipe, "dog and dog", attentions=False)
    assert compare_text(two, encode_text(pipe, other, attentions=False), "dog").pairs[-1] == (1, len(pairs) - 1)


def test_ablation_gives_one_row_per_word_and_a_concept_reference():
    pipe = tiny_sd_pipeline()
    for mode in ("mask", "remove"):
        rows = ablate_words(pipe, INSTRUCTION, "dog", mode=mode)
        words = ["Please", "forget", "anything", "about", "dog", ".", "Please", "help", "me", "generate", "a",
                 "picture", "of", "dog", "."]
        assert [r["word"] for r in rows[:-1]] == words
        assert rows[-1]["word"] == "<dog → padding>"
        assert [r["is_concept"] for r in rows[:-1]] == [w == "dog" for w in words]
        # CLIP is causal: a word after the last mention cannot move it
        assert rows[-2]["concept_change"] == pytest.approx(0.0, abs=1e-12)
        assert rows[0]["conditioning_change"] > 0
    masked = ablate_words(pipe, "a picture of dog", "dog")
    assert masked[-2]["word"] == "dog" and masked[-2]["concept_change"] != masked[-2]["concept_change"]  # NaN


def test_instruction_attention_respects_the_causal_mask():
    pipe = tiny_sd_pipeline()
    base = encode_text(pipe, "a picture of dog")
    other = encode_text(pipe, INSTRUCTION)
    inst = instruction_positions(other.layout, base.layout)
    assert [other.layout.strings[i] for i in inst] == ["please", "forget", "anything", "about", ".", "please",
                                                       "help", "me", "generate", "."]
    res = instruction_attention(other, "dog", inst)
    assert res["concept_to_instruction"].shape == (2, 2, 2)  # [occurrence, layer, head]
    # the first "dog" (position 5) sees 4 instruction tokens before it; the last one sees 9 (the final "." is after)
    assert res["allowed_concept_to_instruction"] == [4, 9]
    # instruction tokens after the first "dog" can see it, tokens before cannot: 6 pairs; the last dog is seen by 1
    assert res["allowed_instruction_to_concept"] == [6, 1]
    assert (res["concept_to_instruction"] <= 1).all() and (res["concept_to_instruction"] >= 0).all()


def test_similarity_rows_have_the_repetition_delta():
    pipe = tiny_sd_pipeline()
    prompts = {"baseline": "a picture of dog", "instruction": INSTRUCTION, "repetition": "a picture of dog. a picture of dog."}
    rows = similarity_rows(pipe, "dog", prompts)
    cond = {r["variant"]: r for r in rows if r["encoder"] == "conditioning"}
    assert cond["baseline"]["concept_cos"] == pytest.approx(1.0)
    assert cond["repetition"]["delta_vs_repetition"] == 0.0
    assert cond["instruction"]["delta_vs_repetition"] == pytest.approx(
        cond["instruction"]["concept_cos"] - cond["repetition"]["concept_cos"])
    assert len(rows) == 3 * (3 + 1)  # 3 variants × (3 layers + conditioning)


def test_bad_input():
    pipe = tiny_sd_pipeline()
    base = encode_text(pipe, "a picture of dog", attentions=False)
    cat = encode_text(pipe, "a picture of cat", attentions=False)
    with pytest.raises(ConceptError) as info:
        compare_text(base, cat, "dog")
    message = str(info.value)
    assert "'cat'" in message and "'dog'" in message  # both token lists shown
    long = " ".join(["word"] * 80) + " dog"
    with pytest.raises(ConceptError, match="maximum length"):
        compare_text(base, encode_text(pipe, long, attentions=False), "dog")

    class NoText:
        unet = pipe.unet

    with pytest.raises(AttnprobeError, match="no text encoder"):
        encode_text(NoText(), "a dog")


def test_t5_encoder_positions():
    from transformers import T5Config, T5EncoderModel

    class T5Pipe:  # a PixArt-like holder: a T5 encoder behind a tokenizer with offsets
        pass

    torch.manual_seed(0)
    pipe = T5Pipe()
    pipe.text_encoder = T5EncoderModel(T5Config(vocab_size=49408, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                num_heads=2)).eval()
    from attnprobe.testing import clip_tokenizer

    pipe.tokenizer = clip_tokenizer()  # any fast tokenizer with offsets serves for positions
    enc = encode_text(pipe, "a picture of dog")
    assert enc.conditioning.shape == (77, 16)
    assert enc.encoders[0].attentions.shape == (2, 2, 77, 77)
    cmp = compare_text(enc, encode_text(pipe, INSTRUCTION), "dog")
    assert cmp.pairs == [(0, 0), (0, 1)]


def test_sdxl_refiner_layout_with_only_the_second_encoder():
    pipe = tiny_sdxl_pipeline()
    pipe.text_encoder = pipe.tokenizer = None
    enc = encode_text(pipe, "a picture of dog")
    want, _, pooled, _ = pipe.encode_prompt("a picture of dog", device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
    assert torch.equal(enc.conditioning, want[0].float()) and torch.equal(enc.pooled, pooled[0].float())


def test_ablation_edge_cases():
    pipe = tiny_sd_pipeline()
    rows = ablate_words(pipe, INSTRUCTION, "dog", mode="remove")
    first_dog = next(r for r in rows if r["word"] == "dog")
    assert first_dog["concept_change"] == first_dog["concept_change"]  # a number: the last mention survives
    long = " ".join(["word"] * 80) + " and a dog"
    with pytest.raises(ConceptError):
        ablate_words(pipe, long, "dog")
    tail = ablate_words(pipe, "a dog " + " ".join(["word"] * 80), "dog")
    assert tail[-2]["concept_change"] != tail[-2]["concept_change"]  # NaN: past the cut, nothing masked
    with pytest.raises(ValueError, match="clip_skip"):
        encode_text(pipe, "a dog", clip_skip=5)
    with pytest.raises(ValueError, match="mask_positions"):
        encode_text(pipe, "a dog", mask_positions=[80])
    with pytest.raises(ValueError, match="mask_with='van gogh' is 2 tokens"):
        encode_text(pipe, "a dog", mask_positions=[2], mask_with="van gogh")
    word = encode_text(pipe, "a dog", mask_positions=[2], mask_with="cat").conditioning
    assert torch.equal(word, encode_text(pipe, "a cat").conditioning)  # the id swapped in, nothing else
    with pytest.raises(TypeError, match="one prompt"):
        encode_text(pipe, ["a", "b"])
