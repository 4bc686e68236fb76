"""Prompts → token layouts, concepts → positions per occurrence, with the real CLIP tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attnprobe import ConceptError
from attnprobe.testing import clip_tokenizer
from attnprobe.text.tokens import TokenLayout, find_concept, token_layout, unlabelled_layout


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def positions_text(layout, found):
    return [" ".join(layout.strings[p] for p in occurrence) for occurrence in found]


# ------------------------------------------------------------------ layouts
def test_known_clip_ids(tok):
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    layout = token_layout(tok, "a photo of a cat")
    assert layout.ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(layout.ids) == len(layout.strings) == len(layout.kinds) == len(layout.offsets) == 77
    assert layout.ids[7:] == [49407] * 70  # SD 1.x pads with the end token
    assert layout.strings[:7] == ["<|startoftext|>", "a", "photo", "of", "a", "cat", "<|endoftext|>"]
    assert layout.kinds[:8] == ["start", "word", "word", "word", "word", "word", "end", "pad"]
    assert set(layout.kinds[7:]) == {"pad"}
    assert layout.offsets[5] == (13, 16) and layout.offsets[0] is None
    assert layout.truncated_at is None and layout.text == "a photo of a cat" and layout.source == "prompt"


def test_sdxl_second_tokenizer_pads_with_bang():
    layout = token_layout(clip_tokenizer(pad_token="!"), "a cat")
    assert layout.kinds[:5] == ["start", "word", "word", "end", "pad"]
    assert layout.ids[4] != 49407


def test_n_keys_and_layout_dict_round_trip(tok):
    layout = token_layout(tok, "a dog", n_keys=10, source="caller")
    assert len(layout.strings) == 10
    assert TokenLayout.from_dict(layout.to_dict()) == layout
    empty = unlabelled_layout(77, source="zeros")
    assert empty.strings == [""] * 77 and set(empty.kinds) == {"unknown"} and empty.text is None


# ------------------------------------------------------------------ concepts
def test_single_word(tok):
    assert find_concept(token_layout(tok, "a photo of a cat"), "cat") == [[5]]


def test_repeats_give_one_list_per_occurrence(tok):
    layout = token_layout(tok, "a dog chases another dog")
    found = find_concept(layout, "dog")
    assert found == [[2], [5]]
    assert positions_text(layout, found) == ["dog", "dog"]


def test_multi_token_phrases_case_insensitive(tok):
    layout = token_layout(tok, "a picture of Van Gogh. Van   gogh!")
    assert find_concept(layout, "van gogh") == [[4, 5], [7, 8]]
    layout = token_layout(tok, "The Eiffel Tower at night")
    found = find_concept(layout, "eiffel tower")
    assert positions_text(layout, found) == ["eiffel tower"]
    assert find_concept(layout, "EIFFEL TOWER") == found


def test_word_split_into_several_tokens(tok):
    layout = token_layout(tok, "a photo of supercalifragilistic things")
    (found,) = find_concept(layout, "supercalifragilistic")
    assert len(found) > 1 and found == list(range(found[0], found[-1] + 1))
    assert "".join(layout.strings[p] for p in found) == "supercalifragilistic"


def test_whole_words_only(tok):
    layout = token_layout(tok, "dogs and a hotdog near the dog's bowl")
    assert positions_text(layout, find_concept(layout, "dog")) == ["dog"]
    with pytest.raises(ConceptError):
        find_concept(token_layout(tok, "two dogs"), "dog")


def test_absent_concept_shows_tokens(tok):
    with pytest.raises(ConceptError) as info:
        find_concept(token_layout(tok, "a red cat"), "dog", where="sample 3")
    message = str(info.value)
    assert "'dog'" in message and "sample 3" in message and "['a', 'red', 'cat']" in message


def test_empty_concept_and_missing_text(tok):
    with pytest.raises(ConceptError, match="empty"):
        find_concept(token_layout(tok, "a dog"), "   ")
    with pytest.raises(ConceptError, match="prompts="):
        find_concept(unlabelled_layout(77), "dog")


def test_truncated_concept(tok):
    text = " ".join(["cat"] * 80) + " dog"
    layout = token_layout(tok, text)
    assert layout.truncated_at is not None and layout.ids[-1] == 49407
    with pytest.raises(ConceptError, match="'dog'") as info:
        find_concept(layout, "dog")
    assert "maximum length" in str(info.value)
    with pytest.raises(ConceptError, match="occurrence 76"):  # one mention cut off is enough to refuse
        find_concept(layout, "cat")


@pytest.mark.parametrize("where, kept", [(74, True), (75, False)])
def test_truncation_boundary(tok, where, kept):
    words = ["cat"] * 80
    words[where] = "dog"
    layout = token_layout(tok, " ".join(words))
    if kept:
        assert find_concept(layout, "dog") == [[75]]
    else:
        with pytest.raises(ConceptError, match="dog"):
            find_concept(layout, "dog")


# ------------------------------------------------------------------ properties
FILLER = st.sampled_from(["red", "house", "tree", "blue", "sky", "under", "the", "big", "car", "doggy", "dogs"])


@settings(max_examples=40, deadline=None)
@given(words=st.lists(FILLER, max_size=40), data=st.data())
def test_inserted_word_is_found_k_times(tok, words, data):
    k = data.draw(st.integers(min_value=1, max_value=6))
    places = sorted(data.draw(st.lists(st.integers(0, len(words)), min_size=k, max_size=k)), reverse=True)
    for p in places:
        words = words[:p] + ["dog"] + words[p:]
    layout = token_layout(tok, " ".join(words))
    found = find_concept(layout, "dog")
    assert len(found) == k
    assert positions_text(layout, found) == ["dog"] * k
    assert [f[0] for f in found] == [i + 1 for i, w in enumerate(words) if w == "dog"]  # one token per word


@settings(max_examples=30, deadline=None)
@given(words=st.lists(st.sampled_from(["Van Gogh", "a", "painting", "by", "VAN  GOGH", "vans", "goghs"]), max_size=20))
def test_phrase_occurrences_match_regex_count(tok, words):
    text = " ".join(words)
    expected = sum(w.lower().split() == ["van", "gogh"] for w in words)
    assume(expected > 0)
    layout = token_layout(tok, text)
    found = find_concept(layout, "van gogh")
    assert len(found) == expected
    assert positions_text(layout, found) == ["van gogh"] * expected
