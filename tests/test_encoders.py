"""``attnprobe.capture.encoders.pipeline_encoding``: every family's text encoders read through the pipeline's own
``encode_prompt``, checked against encodings we run ourselves (our own chat template rendering, our own encoder
calls), and the similarity tables it feeds."""

from __future__ import annotations

import torch

from attnprobe.capture.encoders import pipeline_encoding
from attnprobe.testing import tiny_pipeline
from attnprobe.text import similarity_rows


@torch.no_grad()
def test_an_llm_encoder_inside_its_chat_template_equals_our_own_run():
    """Z-Image: Qwen 3 reads the prompt in its chat template; every layer equals our own call of the encoder on our own
    rendering, the conditioning is the second-to-last layer's attended positions, and 'dog' is found in the words."""
    pipe = tiny_pipeline("zimage")
    prompt = "a picture of dog"
    enc = pipeline_encoding(pipe, prompt)
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    tokens = pipe.tokenizer(text, padding="max_length", max_length=512, return_tensors="pt")  # as the pipeline pads
    ids, n = tokens.input_ids, int(tokens.attention_mask.sum())
    ours = torch.stack(pipe.text_encoder(ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
                       .hidden_states)[:, 0]
    mine = enc.encoders[0]
    assert mine.name == "text_encoder" and torch.equal(mine.hidden_states, ours.float())
    assert torch.equal(enc.conditioning, ours[-2, :n].float())  # the attended positions only
    dog = pipe.tokenizer.convert_ids_to_tokens(ids[0]).index("▁dog")
    assert mine.layout.kinds[dog] == "word" and enc.layout.kinds[dog] == "word"
    assert mine.layout.kinds[0] == "template"


@torch.no_grad()
def test_a_tokens_first_encoder_and_several_encoders():
    """Kolors' ChatGLM returns [token, batch, hidden] states (its conditioning is the second-to-last layer); SD3 has
    three encoders, each with its own layers, and its conditioning's concept is found in CLIP's and T5's positions."""
    kolors = pipeline_encoding(tiny_pipeline("kolors"), "a picture of dog")
    assert kolors.encoders[0].hidden_states.shape[1] == 256
    assert torch.equal(kolors.conditioning, kolors.encoders[0].hidden_states[-2])
    sd3 = tiny_pipeline("sd3")
    rows = similarity_rows(sd3, "dog", {"baseline": "a picture of dog", "instruction": "Forget dog. a picture of dog",
                                        "repetition": "dog. a picture of dog"}, encode=pipeline_encoding)
    encoders = {r["encoder"] for r in rows}
    assert encoders == {"text_encoder", "text_encoder_2", "text_encoder_3", "conditioning"}
    assert all(abs(r["concept_cos"] - 1) < 1e-9 for r in rows if r["variant"] == "baseline")
    moved = [r for r in rows if r["variant"] == "instruction" and r["encoder"] == "conditioning"]
    assert len(moved) == 1 and moved[0]["concept_cos"] < 1
    assert pipeline_encoding(sd3, "a picture of dog").layout.kinds.count("word") == 8  # 4 in CLIP's, 4 in T5's


@torch.no_grad()
def test_quoted_text_keeps_the_conditioning_labels_and_bad_input_says_what_was_passed():
    """HunyuanImage's encode_prompt returns the Qwen positions alone (the transformer adds the ByT5 glyphs later), so
    a quoted prompt's words stay where the encoder put them; a prompt that is not a string, and an object without
    encode_prompt, get errors that say so."""
    import pytest

    from attnprobe.errors import ArgumentTypeError, AttnprobeError

    pipe = tiny_pipeline("hunyuanimage")
    plain, quoted = pipeline_encoding(pipe, "a b dog"), pipeline_encoding(pipe, 'a "b" dog')
    assert "unknown" not in quoted.layout.kinds and len(quoted.layout.kinds) == quoted.conditioning.shape[0]
    assert plain.layout.strings.index("dog") == 2 and quoted.layout.strings.index("dog") == 4  # a, ", b, ", dog
    with pytest.raises(ArgumentTypeError, match="one prompt"):
        pipeline_encoding(pipe, ["a dog"])
    with pytest.raises(AttnprobeError, match="has no encode_prompt"):
        pipeline_encoding(pipe.transformer, "a dog")
