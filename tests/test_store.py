"""AttentionStore: access, save → load round trips (exact), and StoreError for every broken file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnprobe.store.files
from attnprobe import AttentionStore, StoreError, probe
from attnprobe.testing import synthetic_store


def assert_same_store(a: AttentionStore, b: AttentionStore) -> None:
    assert a.sites == b.sites
    assert a.calls == b.calls
    assert a.samples == b.samples
    assert a.meta == b.meta
    assert a.flat_sites == b.flat_sites
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for s in a.samples:
        assert a.layout(s) == b.layout(s)
        assert a.tokens(s) == b.tokens(s) and a.token_kinds(s) == b.token_kinds(s)


@pytest.fixture(scope="module")
def real_store(sd_pipe):
    """A probe of the tiny SD pipeline: 2 calls, uncond + cond samples, 16 sites, fp16 maps."""
    with probe(sd_pipe, passes="all") as store:
        sd_pipe("a picture of dog", negative_prompt="cat", generator=torch.Generator().manual_seed(0),
                height=64, width=64, num_inference_steps=2, output_type="latent")
    return store


# ------------------------------------------------------------------ access
def test_shapes_and_access(real_store):
    assert len(real_store) == 16 and len(real_store.calls) == 2 and len(real_store.samples) == 2
    first = real_store.sites[0]
    assert real_store[first].shape == (2, 2, 2, 8, 8, 77)
    assert real_store[first] is real_store[first.name]
    assert first in real_store and first.name in real_store and "nope" not in real_store
    assert list(real_store) == real_store.site_names
    assert real_store.nbytes == sum(real_store[n].numel() * 2 for n in real_store)  # fp16
    assert "16 sites, 2 calls, 2 samples" in repr(real_store)


def test_unknown_site_and_sample_errors_list_what_exists(real_store):
    with pytest.raises(KeyError) as info:
        real_store["up_blocks.9.attn2"]
    assert real_store.site_names[0] in str(info.value)
    with pytest.raises(IndexError) as info:
        real_store.tokens(5)
    assert "'a picture of dog'" in str(info.value) and "uncond" in str(info.value)


def test_tokens_of_each_sample(real_store):
    uncond, cond = real_store.samples
    assert real_store.tokens(cond)[:6] == ["<|startoftext|>", "a", "picture", "of", "dog", "<|endoftext|>"]
    assert real_store.token_kinds(cond)[:7] == ["start", "word", "word", "word", "word", "end", "pad"]
    assert real_store.tokens(uncond)[1] == "cat"
    assert real_store.token_indices(cond, "dog") == [[4]] and real_store.token_indices(uncond, "cat") == [[1]]


# ------------------------------------------------------------------ round trips
def test_round_trip_of_a_probe_store(real_store, tmp_path):
    path = real_store.save(tmp_path / "sub" / "store.safetensors")
    assert path == tmp_path / "sub" / "store.safetensors"
    assert_same_store(real_store, AttentionStore.load(path))
    assert AttentionStore.load(str(path)).sites[0].order == 0


def test_round_trip_of_a_synthetic_store(tmp_path):
    store = synthetic_store(calls=3, grid=(2, 3), heads=1, sites=2, mass={"dog": [0.1, 0.2, 0.3]})
    store.flat_sites.add(store.site_names[1])
    store[store.site_names[0]]  # noqa: B018 — nothing pending; save must not depend on it
    loaded = AttentionStore.load(store.save(tmp_path / "s.safetensors"))
    assert_same_store(store, loaded)
    assert loaded.token_indices(0, "dog") == [[4]]


@settings(max_examples=15, deadline=None)
@given(
    calls=st.integers(1, 3),
    grid=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    heads=st.integers(1, 3),
    sites=st.integers(1, 3),
    words=st.lists(st.sampled_from(["red", "Dog", "van gogh", "tree", "café", "!", "a"]), min_size=1, max_size=12),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_round_trip_property(calls, grid, heads, sites, words, dtype):
    store = synthetic_store(calls=calls, prompt=" ".join(words), grid=grid, heads=heads, sites=sites)
    for name in store:
        store._maps[name] = store[name].to(dtype)
    with tempfile.TemporaryDirectory() as folder:
        loaded = AttentionStore.load(store.save(Path(folder) / "s.safetensors"))
        assert os.listdir(folder) == ["s.safetensors"]
    assert_same_store(store, loaded)


# ------------------------------------------------------------------ atomic save
def test_save_leaves_no_temporary_file(real_store, tmp_path):
    real_store.save(tmp_path / "a.safetensors")
    real_store.save(tmp_path / "a.safetensors")  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_failed_save_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    old = synthetic_store(calls=1)
    path = old.save(tmp_path / "a.safetensors")
    before = path.read_bytes()
    real_save = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        synthetic_store(calls=3).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


# ------------------------------------------------------------------ broken files
def test_missing_file(tmp_path):
    with pytest.raises(StoreError, match="no store file"):
        AttentionStore.load(tmp_path / "absent.safetensors")
    with pytest.raises(StoreError):
        AttentionStore.load(tmp_path)  # a folder


def test_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
                     .numpy().tobytes())
    with pytest.raises(StoreError, match="corrupt or truncated"):
        AttentionStore.load(path)


@pytest.mark.parametrize("cut", ["half", "last byte", "9 tenths", "header length only", "empty"])
def test_truncated_file(real_store, tmp_path, cut):
    path = real_store.save(tmp_path / "store.safetensors")
    data = path.read_bytes()
    keep = {"half": len(data) // 2, "last byte": len(data) - 1, "9 tenths": len(data) * 9 // 10,
            "header length only": 8, "empty": 0}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(StoreError):
        AttentionStore.load(path)


def test_truncated_small_store(tmp_path):
    path = synthetic_store().save(tmp_path / "store.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError):
        AttentionStore.load(path)


def _write(path, tensors, header):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=None if header is None else {"attnprobe": header})
    return path


def test_foreign_or_edited_files(tmp_path):
    good = synthetic_store()
    header = {k: v for k, v in attnprobe.store.files.header(good).items() if k != "store_id"}  # no record: 0.2.0's
    maps = {n: good[n] for n in good}
    with pytest.raises(StoreError, match="not an attnprobe store"):
        AttentionStore.load(_write(tmp_path / "a", maps, None))
    with pytest.raises(StoreError, match="corrupt"):
        AttentionStore.load(_write(tmp_path / "b", maps, "{not json"))
    with pytest.raises(StoreError, match="format"):
        AttentionStore.load(_write(tmp_path / "c", maps, json.dumps(dict(header, format=99))))
    with pytest.raises(StoreError, match="lacks the maps"):
        AttentionStore.load(_write(tmp_path / "d", {"other": torch.zeros(1)}, json.dumps(header)))
    bad_shape = {n: t[:1] for n, t in maps.items()}
    with pytest.raises(StoreError, match="shape"):
        AttentionStore.load(_write(tmp_path / "e", bad_shape, json.dumps(header)))


@pytest.mark.parametrize("header", ['{"format": 1}', "[]", '{"format": 1, "sites": [{"name": 1}]}'])
def test_malformed_header_is_a_store_error(tmp_path, header):
    with pytest.raises(StoreError):
        AttentionStore.load(_write(tmp_path / "f", {"x": torch.zeros(1)}, header))
