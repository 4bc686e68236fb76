"""Files that cannot lie: checksums, store ids, gaps, header-against-maps checks and file-system errors of stores.

Stores are synthetic (``synthetic_store``) and streamed through the store's own ``StoreWriter``, as a probe does;
``tests/data`` holds a file and a streamed folder written by attnprobe 0.2.0 (before checksums), which must load.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import attnprobe
from attnprobe import ArgumentTypeError, AttentionStore, AttnprobeError, StoreError, StoreIOError
from attnprobe.store import StoreWriter
from attnprobe.store.integrity import INTEGRITY_KEY, check_values
from attnprobe.testing import synthetic_store

DATA = Path(__file__).parent / "data"


def _store(calls=3, sites=2, prompt="a picture of dog", **kwargs):
    concept = prompt.split()[-1]
    return synthetic_store(calls=calls, sites=sites, prompt=prompt, mass={concept: [0.1 * (i + 1) for i in range(calls)]},
                           **kwargs)


def _stream(folder, calls=4, prompt="a picture of dog", finish=True, nan_sample=False):
    """A streamed store written the way a probe writes one: header first, one shard per call, header at the end."""
    store = _store(calls=calls, prompt=prompt)
    writer = StoreWriter(store.sites, dict(store.meta), folder)
    writer.set_samples(store.samples, [store.layout(0)])
    writer.write_header({**store.meta, "complete": False})
    for i, call in enumerate(store.calls):
        maps = {n: store[n][i] for n in store}
        if nan_sample and i == 1:
            maps = {n: torch.full_like(m, float("nan")) for n, m in maps.items()}
        writer.append(call, maps)
    if finish:
        writer.store.meta["complete"] = True
        writer.finish(store.sites)
    return writer.store


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _rewrite(path, header=None, integrity="keep", maps=None):
    """Rewrite a saved store with another header (a dict) or maps; ``integrity=None`` drops its integrity record
    (a file as attnprobe 0.2.0 wrote it)."""
    meta = _metadata(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if header is not None:
        meta["attnprobe"] = json.dumps(header)
    if integrity is None:  # as 0.2.0 wrote it: no record, no store id
        meta.pop(INTEGRITY_KEY)
        meta["attnprobe"] = json.dumps({k: v for k, v in json.loads(meta["attnprobe"]).items() if k != "store_id"})
    save_file(maps if maps is not None else tensors, str(path), metadata=meta)
    return path


def _flip_last_data_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last map's values (the header comes first)
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------- checksums
def test_a_saved_store_carries_checksums_and_its_id(tmp_path):
    store = _store()
    path = store.save(tmp_path / "s.safetensors")
    record = json.loads(_metadata(path)[INTEGRITY_KEY])
    assert record["hash"] == "sha256" and len(record["data"]) == 64 and len(record["header"]) == 64
    back = AttentionStore.load(path)
    assert back.store_id == store.store_id and len(store.store_id) == 32
    assert torch.equal(back[back.site_names[0]], store[store.site_names[0]])


def test_a_flipped_byte_in_the_maps_is_refused(tmp_path):
    path = _store().save(tmp_path / "s.safetensors")
    _flip_last_data_byte(path)
    with pytest.raises(StoreError, match=r"s\.safetensors'.*checksum of its maps \(data\) does not match"):
        AttentionStore.load(path)
    AttentionStore.load(path, verify=False)  # asked not to read the maps: loads


def test_a_changed_header_is_refused(tmp_path):
    path = _store().save(tmp_path / "s.safetensors")
    header = json.loads(_metadata(path)["attnprobe"])
    header["samples"][0]["text"] = "a picture of cat"
    _rewrite(path, header)
    with pytest.raises(StoreError, match="checksum of its header"):
        AttentionStore.load(path)


def test_a_value_out_of_range_is_refused_also_without_a_checksum(tmp_path):
    store = _store()
    maps = {n: store[n].clone() for n in store}
    maps[store.site_names[1]][1, 0, 0, 0, 0, 3] = 187.5  # what one flipped exponent bit made of a probability
    path = _rewrite(store.save(tmp_path / "s.safetensors"), integrity=None, maps=maps)
    with pytest.raises(StoreError, match=r"holds values from .* to 187\.5, but its maps are probabilities in \[0, 1\]"):
        AttentionStore.load(path)


def test_checked_values(tmp_path):
    probs = torch.full((2, 3, 1, 2, 2, 4), 0.25)
    check_values("x", "s", probs)
    probs[1, 2] = float("nan")  # a sample without a row in call 1: legitimate
    check_values("x", "s", probs)
    summed = torch.zeros(1, 2, 1, 1, 1, 4)
    summed[..., 0] = 3.0  # aggregate="sum" over 3 calls: all on one token
    check_values("x", "s", summed, high=3.0)
    for bad, match in [((0, 0, 0, 0, 0, 0), "part of the map of \\(call, sample\\) \\(0, 0\\)"),
                       ((0, 1, 0, 0, 0, 0), None)]:
        broken = probs.clone()
        broken[bad] = float("nan")
        with pytest.raises(StoreError, match=match or "NaN"):
            check_values("x", "s", broken)
    for value in (float("inf"), -0.5, 1.01):
        broken = probs.clone()
        broken[0, 0, 0, 0, 0, 0] = value
        with pytest.raises(StoreError, match="probabilities in"):
            check_values("x", "s", broken)
    shard = torch.full((4, 3, 1, 2, 2), 0.25)  # [token, sample, head, qh, qw]
    shard[:, 1] = float("nan")
    check_values("x", "s", shard, token_major=True)
    shard[0, 2, 0, 0, 0] = float("nan")
    with pytest.raises(StoreError, match="part of the map of sample 2"):
        check_values("x", "s", shard, token_major=True)


def test_a_streamed_store_with_a_sample_without_a_row_loads(tmp_path):
    _stream(tmp_path / "s", nan_sample=True)
    back = AttentionStore.load(tmp_path / "s")
    assert back[back.site_names[0]][1].isnan().all() and not back[back.site_names[0]][0].isnan().any()


def test_the_models_own_nan_in_part_of_a_map_is_saved_with_a_warning_and_loads(tmp_path):
    """From a breaker: a site whose q held a NaN (a diverged weight) gets NaN in part of a map, as the model computed
    it; the probe's own file was then refused as damaged at load. The integrity record now names such sites, save and
    streaming say so, and load accepts them (and still refuses partial NaN in a file whose record names none)."""
    store = _store()
    site = store.site_names[0]
    maps = {n: store[n].clone() for n in store}
    maps[site][0, 0, 0, 0, 0, :2] = float("nan")  # one query of one head: the model's NaN
    writer = StoreWriter(store.sites, dict(store.meta))
    writer.set_samples(store.samples, [store.layout(0)])
    for i, call in enumerate(store.calls):
        writer.append(call, {n: m[i] for n, m in maps.items()})
    writer.finish(store.sites)
    with pytest.warns(UserWarning, match=f"sites \\['{site}'\\] hold NaN inside their maps: the model's own"):
        path = writer.store.save(tmp_path / "s.safetensors")
    back = AttentionStore.load(path)
    assert torch.equal(back[site].isnan(), maps[site].isnan())
    with pytest.raises(StoreError, match="part of the map of \\(call, sample\\) \\(0, 0\\)"):
        AttentionStore.load(_rewrite(path, integrity=None))  # a record that names no NaN: damage, as before

    folder = tmp_path / "streamed"
    writer = StoreWriter(store.sites, dict(store.meta), folder)
    writer.set_samples(store.samples, [store.layout(0)])
    writer.write_header({**store.meta, "complete": False})
    with pytest.warns(UserWarning, match="hold NaN inside their maps"):
        for i, call in enumerate(store.calls):
            writer.append(call, {n: m[i] for n, m in maps.items()})
    writer.store.meta["complete"] = True
    writer.finish(store.sites)
    assert torch.equal(AttentionStore.load(folder)[site].isnan(), maps[site].isnan())


# ---------------------------------------------------------------------------------------------- streamed stores
def test_a_streamed_store_carries_its_id_in_the_header_and_every_shard(tmp_path):
    store = _stream(tmp_path / "s")
    header = json.loads((tmp_path / "s" / "attnprobe.json").read_text())
    assert header["store_id"] == store.store_id and header["integrity"]["hash"] == "sha256"
    for i, shard in enumerate(sorted((tmp_path / "s" / "calls").iterdir())):
        record = json.loads(_metadata(shard)[INTEGRITY_KEY])
        assert (record["store_id"], record["shard"]) == (store.store_id, i)
    back = AttentionStore.load(tmp_path / "s")
    assert back.store_id == store.store_id and [c.index for c in back.calls] == [0, 1, 2, 3]


def test_a_shard_copied_from_another_streamed_store_is_refused(tmp_path):
    _stream(tmp_path / "a")
    _stream(tmp_path / "b", prompt="a picture of cat")  # same sites and shapes: only its id tells it apart
    shutil.copy(tmp_path / "b" / "calls" / "00000002.safetensors", tmp_path / "a" / "calls" / "00000002.safetensors")
    with pytest.raises(StoreError, match=r"00000002\.safetensors' is a shard of another store \(store id"):
        AttentionStore.load(tmp_path / "a")
    with pytest.raises(StoreError, match="a shard of another store"):
        AttentionStore.load(tmp_path / "a", verify=False, missing_calls="skip")  # no option lets it in


def test_a_flipped_byte_in_a_shard_is_refused(tmp_path):
    _stream(tmp_path / "s")
    _flip_last_data_byte(tmp_path / "s" / "calls" / "00000001.safetensors")
    with pytest.raises(StoreError, match=r"00000001\.safetensors'.*checksum of its maps"):
        AttentionStore.load(tmp_path / "s")


def test_an_edited_streamed_header_is_refused(tmp_path):
    _stream(tmp_path / "s")
    path = tmp_path / "s" / "attnprobe.json"
    header = json.loads(path.read_text())
    header["sites"] = header["sites"][:1]
    path.write_text(json.dumps(header))
    with pytest.raises(StoreError, match="attnprobe.json'.*checksum of its header"):
        AttentionStore.load(tmp_path / "s")
    del header["integrity"]  # the record removed: the store id shows it was there
    path.write_text(json.dumps(header))
    with pytest.raises(StoreError, match="store id but no integrity entry"):
        AttentionStore.load(tmp_path / "s")


@pytest.mark.parametrize("finish", [True, False], ids=["finished", "interrupted"])
def test_a_middle_shard_deleted_names_the_missing_call(tmp_path, finish):
    _stream(tmp_path / "s", calls=5, finish=finish)
    (tmp_path / "s" / "calls" / "00000002.safetensors").unlink()
    with pytest.raises(StoreError, match=r"lacks 1 of .*5 calls.*shards \[2\] \(00000002\.safetensors\).*"
                                         r"join calls that are not consecutive.*missing_calls='skip'") as info:
        AttentionStore.load(tmp_path / "s")
    assert ("denoiser calls [2]" in str(info.value)) == finish  # a finished header says which call it was
    with pytest.warns(attnprobe.AttnprobeWarning, match=r"shards \[2\].*loaded without them"):
        back = AttentionStore.load(tmp_path / "s", missing_calls="skip")
    assert [c.index for c in back.calls] == [0, 1, 3, 4] and back.meta["missing_calls"] == [2]
    assert back[back.site_names[0]].shape[0] == 4
    with pytest.raises(attnprobe.ArgumentError, match="missing_calls='ignore' is not one of"):
        AttentionStore.load(tmp_path / "s", missing_calls="ignore")


def test_the_last_shard_of_a_finished_store_deleted_is_a_gap_too(tmp_path):
    _stream(tmp_path / "s", calls=3)
    (tmp_path / "s" / "calls" / "00000002.safetensors").unlink()
    with pytest.raises(StoreError, match=r"lacks 1 of the 3 calls its header lists: shards \[2\].*would leave out "
                                         r"its last calls unnoticed"):
        AttentionStore.load(tmp_path / "s")
    (tmp_path / "s" / "calls" / "00000000.safetensors").unlink()
    with pytest.raises(StoreError, match=r"shards \[0, 2\].*would leave out its first and last calls unnoticed"):
        AttentionStore.load(tmp_path / "s")
    (tmp_path / "s" / "calls" / "00000001.safetensors").unlink()
    with pytest.raises(StoreError, match=r"lacks 3 of the 3 calls.*no shard of a call is left to load$"):
        AttentionStore.load(tmp_path / "s")


def test_an_interrupted_store_without_a_gap_loads(tmp_path):
    _stream(tmp_path / "s", calls=3, finish=False)
    back = AttentionStore.load(tmp_path / "s")
    assert [c.index for c in back.calls] == [0, 1, 2] and back.meta["complete"] is False


def test_a_renamed_shard_is_refused(tmp_path):
    _stream(tmp_path / "s", calls=3, finish=False)
    calls = tmp_path / "s" / "calls"
    (calls / "00000002.safetensors").rename(calls / "00000005.safetensors")
    with pytest.raises(StoreError, match=r"is shard 2 of its store, but its file name says 00000005"):
        AttentionStore.load(tmp_path / "s")


# ---------------------------------------------------------------------------------------------- header lies
def _lying(tmp_path, edit) -> Path:
    """A saved 16-site store whose header was edited by ``edit`` and whose integrity record was removed (as in a
    file of attnprobe 0.2.0, which has none): the header is then checked against the maps alone."""
    path = _store(sites=16).save(tmp_path / "s.safetensors")
    header = json.loads(_metadata(path)["attnprobe"])
    edit(header)
    return _rewrite(path, header, integrity=None)


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.update(sites=h["sites"][:1]), "holds maps of 16 sites, but its header lists 1"),
    (lambda h: h["samples"][0].update(index=7), "sample 0 of its header has index 7"),
    (lambda h: h.update(token_positions="xyz"), "token_positions 'xyz' are not distinct prompt positions"),
    (lambda h: h.update(token_positions=[3, 80]), "token_positions \\[3, 80\\] are not"),
    (lambda h: h.update(samples=h["samples"] + [dict(h["samples"][0], index=1)], layouts=h["layouts"] * 2),
     "expected \\[3 calls, 2 samples"),
    (lambda h: h.update(calls=h["calls"][:2]), "expected \\[2 calls"),
    (lambda h: h["sites"][0].update(heads=1), "head \\(≤ 1\\)"),
], ids=["1 site for 16", "sample index 7", "token positions xyz", "token position 80", "2 samples", "2 calls", "heads"])
def test_a_header_that_contradicts_its_maps_is_refused(tmp_path, edit, match):
    path = _lying(tmp_path, edit)
    with pytest.raises(StoreError, match=match) as info:
        AttentionStore.load(path)
    assert str(path) in str(info.value)


def test_a_lying_header_with_its_checksum_is_refused_by_the_checksum(tmp_path):
    path = _store(sites=16).save(tmp_path / "s.safetensors")
    header = json.loads(_metadata(path)["attnprobe"])
    header["sites"] = header["sites"][:1]
    _rewrite(path, header)
    with pytest.raises(StoreError, match="checksum of its header"):
        AttentionStore.load(path)


# ---------------------------------------------------------------------------------------------- old files
def test_files_of_attnprobe_0_2_0_load_without_checksums():
    """Written by attnprobe 0.2.0 (main before checksums): no integrity records, no store id; no warning either."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saved = AttentionStore.load(DATA / "store_0.2.0.safetensors")
        streamed = AttentionStore.load(DATA / "streamed_0.2.0")
    assert INTEGRITY_KEY not in _metadata(DATA / "store_0.2.0.safetensors")
    for store in (saved, streamed):
        assert [c.index for c in store.calls] == [0, 1, 2] and len(store.sites) == 2
        assert attnprobe.trajectory(store, "dog").tolist() == pytest.approx([0.1, 0.2, 0.3], abs=1e-3)


def test_an_old_streamed_store_with_a_gap_is_refused_too(tmp_path):
    shutil.copytree(DATA / "streamed_0.2.0", tmp_path / "s")
    (tmp_path / "s" / "calls" / "00000001.safetensors").unlink()
    with pytest.raises(StoreError, match=r"shards \[1\]"):
        AttentionStore.load(tmp_path / "s")


def test_a_new_shard_in_an_old_store_or_an_old_shard_in_a_new_store_is_refused(tmp_path):
    shutil.copytree(DATA / "streamed_0.2.0", tmp_path / "old")
    _stream(tmp_path / "new", calls=3)
    shutil.copy(tmp_path / "new" / "calls" / "00000001.safetensors", tmp_path / "old" / "calls")
    with pytest.raises(StoreError, match="a shard of another store"):
        AttentionStore.load(tmp_path / "old")
    shutil.copy(DATA / "streamed_0.2.0" / "calls" / "00000001.safetensors", tmp_path / "new" / "calls")
    with pytest.raises(StoreError, match="has no integrity record, but its store's header has one"):
        AttentionStore.load(tmp_path / "new")


# ---------------------------------------------------------------------------------------------- bad input, full disks
@pytest.mark.parametrize("path", [None, 123, b"/tmp/x", ["a"]])
def test_load_and_save_refuse_what_is_not_a_path(path):
    with pytest.raises(ArgumentTypeError, match=f"takes a file or folder path .*got {type(path).__name__}"):
        AttentionStore.load(path)
    with pytest.raises(ArgumentTypeError, match="store.save takes a file or folder path"):
        _store().save(path)


def test_save_to_a_folder_that_cannot_be_made_names_the_path_and_cause():
    with pytest.raises(StoreIOError, match=r"cannot save the store to '/proc/nope/x': No such file or directory") as e:
        _store().save("/proc/nope/x")
    assert isinstance(e.value, OSError) and isinstance(e.value, StoreError)


def test_compare_with_something_that_is_not_a_store():
    store = _store()
    with pytest.raises(ArgumentTypeError, match="other is a str 'x', not an AttentionStore"):
        attnprobe.compare(store, "x", "dog")
    with pytest.raises(ArgumentTypeError, match="base is a NoneType None"):
        attnprobe.compare(None, store, "dog")


@pytest.mark.parametrize("call", [
    lambda x: attnprobe.trajectory(x, "dog"), lambda x: attnprobe.heatmap(x, "dog"),
    lambda x: attnprobe.analysis.concept_positions(x, "dog"), lambda x: attnprobe.relation_map(x, "self", "a"),
    lambda x: attnprobe.analysis.video.frame_heatmaps(x, "dog", 9, (8, 8)),
    lambda x: attnprobe.animate_heatmap(x, "dog", [], "/tmp/none.gif"),
    lambda x: attnprobe.analysis.figures.plot_site_call_grid(x, "dog"), lambda x: attnprobe.analysis.daam.daam_sites(x),
], ids=["trajectory", "heatmap", "concept_positions", "relation_map", "frame_heatmaps", "animate_heatmap",
        "plot_site_call_grid", "daam_sites"])
def test_the_measures_say_what_they_were_given_instead_of_a_store(call, tmp_path):
    """A path (the file a store was saved to) or None, where a store belongs: the measure's name, what it got and
    how to load one, not an AttributeError from inside (nor the error of a broken ``__repr__``)."""
    class Broken:
        def __repr__(self):
            raise RuntimeError("no repr")

    for wrong, shown in ((str(tmp_path / "s.safetensors"), "a str '"), (None, "a NoneType None"), (Broken(), "a Broken,")):
        with pytest.raises(ArgumentTypeError, match=f"store is {shown}.*not an AttentionStore.*AttentionStore.load"):
            call(wrong)


def _full_disk(monkeypatch, after: int = 0):
    """From the ``after``-th write on, safetensors' writes fail as on a full disk (a half-written file left)."""
    import safetensors.torch

    real, count = safetensors.torch.save_file, [0]

    def save_file(tensors, filename, metadata=None):
        count[0] += 1
        if count[0] <= after:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_save_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = _store(calls=1).save(tmp_path / "s.safetensors")
    before = path.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(StoreIOError, match=r"cannot save the store to '.*s\.safetensors': No space left on device "
                                           r"\(the disk is full") as info:
        _store().save(path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.safetensors"]


def test_streaming_onto_a_full_disk_keeps_the_calls_written_before(tmp_path, monkeypatch):
    _full_disk(monkeypatch, after=2)
    with pytest.raises(StoreIOError, match=r"cannot write the shard '.*00000002\.safetensors': No space left"):
        _stream(tmp_path / "s", calls=4)
    back = AttentionStore.load(tmp_path / "s")
    assert [c.index for c in back.calls] == [0, 1] and back.meta["complete"] is False
    assert sorted(p.name for p in (tmp_path / "s" / "calls").iterdir()) == ["00000000.safetensors",
                                                                           "00000001.safetensors"]


def test_a_probe_streaming_onto_a_full_disk_raises_a_store_error(sd_pipe, tmp_path, monkeypatch):
    _full_disk(monkeypatch, after=1)
    with pytest.raises(StoreIOError, match="No space left on device"):
        with attnprobe.probe(sd_pipe, stream_to=tmp_path / "s"):
            sd_pipe("a picture of dog", num_inference_steps=3, height=64, width=64, output_type="latent")
    back = AttentionStore.load(tmp_path / "s")
    assert [c.index for c in back.calls] == [0]


def test_a_header_that_cannot_be_written_is_a_store_io_error(tmp_path, monkeypatch):
    import attnprobe._atomic

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(attnprobe.store.shards, "write_atomic", full)
    with pytest.raises(StoreIOError, match="cannot write the header '.*attnprobe.json': No space left"):
        _stream(tmp_path / "s")


def test_every_store_error_is_an_attnprobe_error():
    assert issubclass(StoreIOError, StoreError) and issubclass(StoreIOError, OSError)
    assert issubclass(StoreError, AttnprobeError)


def test_a_removed_integrity_record_is_refused_where_the_store_id_shows_it_was_there(tmp_path):
    """Only files with a record have a store id: a saved file or a streamed header that has one and no record was
    edited (its checks would otherwise be skipped)."""
    path = _store().save(tmp_path / "s.safetensors")
    meta = _metadata(path)
    meta.pop(INTEGRITY_KEY)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: torch.full_like(f.get_tensor(k), 0.01) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(StoreError, match="has a store id but no integrity record"):
        AttentionStore.load(path)
    folder = tmp_path / "streamed"
    _stream(folder)
    header = json.loads((folder / "attnprobe.json").read_text())
    header.pop("integrity")
    header["samples"][0]["text"] = "a picture of cat"
    (folder / "attnprobe.json").write_text(json.dumps(header))
    with pytest.raises(StoreError, match="store id but no integrity entry"):
        AttentionStore.load(folder)


def test_maps_that_are_not_floats_are_refused(tmp_path):
    store = _store()
    path = _rewrite(store.save(tmp_path / "s.safetensors"), integrity=None,
                    maps={n: torch.ones_like(store[n], dtype=torch.uint8) for n in store})
    with pytest.raises(StoreError, match="holds torch.uint8 values"):
        AttentionStore.load(path)


def test_the_temporary_file_safetensors_writes_first_is_a_temporary_file():
    from attnprobe._atomic import is_temporary

    assert is_temporary(".tmpP3932e") and is_temporary(".s.safetensors.123.tmp")
    assert not is_temporary("auc.csv") and not is_temporary(".tmp") and not is_temporary("tmp12345678")


def test_a_probe_streaming_to_something_that_is_not_a_path_is_refused(sd_pipe):
    with pytest.raises(attnprobe.ProbeError, match="stream_to=123 is not a folder path"):
        attnprobe.probe(sd_pipe, stream_to=123).__enter__()


def test_maps_whose_sum_over_tokens_is_over_one_are_refused(tmp_path):
    store = _store()
    path = _rewrite(store.save(tmp_path / "s.safetensors"), integrity=None,
                    maps={n: torch.full_like(store[n], 0.9) for n in store})
    with pytest.raises(StoreError, match="sum to 69.3, but a query's probabilities sum to at most 1"):
        AttentionStore.load(path)


def test_saved_and_streamed_files_get_the_permissions_a_plain_write_gives(tmp_path):
    """safetensors writes a private (0o600) temporary file and renames it: the store's files get 0o666 less the
    umask as any written file does, and a file saved over keeps its own permissions."""
    import stat

    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    old = os.umask(0o022)
    try:
        store = _store()
        store.save(tmp_path / "s.safetensors")
        assert mode(tmp_path / "s.safetensors") == 0o644
        os.chmod(tmp_path / "s.safetensors", 0o640)
        store.save(tmp_path / "s.safetensors")
        assert mode(tmp_path / "s.safetensors") == 0o640
        _stream(tmp_path / "stream")
        files = [p for p in (tmp_path / "stream").rglob("*") if p.is_file()]
        assert len(files) > 2 and {mode(p) for p in files} == {0o644}, {p.name: oct(mode(p)) for p in files}
    finally:
        os.umask(old)


def test_a_streamed_stores_header_given_as_the_store_points_to_its_folder(tmp_path):
    _stream(tmp_path / "s")
    with pytest.raises(StoreError, match=r"attnprobe.json' is the header of a streamed store: load its folder, "
                                         r"AttentionStore.load\('.*/s'\)"):
        AttentionStore.load(tmp_path / "s" / "attnprobe.json")
    shutil.rmtree(tmp_path / "s" / "calls")  # the header alone still points to its folder
    with pytest.raises(StoreError, match=r"attnprobe.json' is the header of a streamed store: load its folder"):
        AttentionStore.load(tmp_path / "s" / "attnprobe.json")
    assert AttentionStore.load(_store().save(tmp_path / "attnprobe.json")).site_names  # a store saved by that name
    header = tmp_path / "s" / "attnprobe.json"
    header.write_text("\n  " + header.read_text())  # JSON that starts with spaces is still JSON
    with pytest.raises(StoreError, match=r"attnprobe.json' is the header of a streamed store: load its folder"):
        AttentionStore.load(header)


def test_a_folder_whose_attnprobe_json_is_other_json_is_not_a_store(tmp_path):
    (tmp_path / "y").mkdir()
    for text in ('{"name": "my notes"}', "[1, 2]"):
        (tmp_path / "y" / "attnprobe.json").write_text(text)
        with pytest.raises(StoreError, match=r"y' is not an attnprobe store: its header \(JSON (dict|list)\) has no "
                                             "store format"):
            AttentionStore.load(tmp_path / "y")


def test_a_concept_where_token_positions_go_says_where_its_positions_come_from():
    store = _store()
    with pytest.raises(attnprobe.ArgumentTypeError, match=r"token positions must be .*got the string 'dog': a "
                                                          r"concept's positions are store.token_indices"):
        store.maps(store.site_names[0], tokens="dog")


def test_save_to_a_path_ending_with_a_separator_is_refused(tmp_path):
    """``Path("new/")`` is ``Path("new")``: saving there would make a file named like the folder that was meant."""
    with pytest.raises(StoreError, match=r"new/' ends with a path separator, as a folder does; give a file name such "
                                         r"as '.*new/store.safetensors'"):
        _store().save(f"{tmp_path}/new/")
    for dots in (".", ".."):  # Path("new/.") is Path("new") too
        with pytest.raises(StoreError, match=rf"new/\{dots}' names a folder \('\{dots}'\); give a file name such as "):
            _store().save(f"{tmp_path}/new/{dots}")
    assert not (tmp_path / "new").exists()
    assert _store().save(tmp_path / "made" / "s.safetensors").is_file()  # a missing folder is made


def test_saving_through_a_symbolic_link_writes_the_file_it_points_to(tmp_path):
    target = _store().save(tmp_path / "real.safetensors")
    (tmp_path / "link.safetensors").symlink_to(target)
    store = _store()
    store.meta["note"] = "saved again"
    store.save(tmp_path / "link.safetensors")
    assert (tmp_path / "link.safetensors").is_symlink()  # the rename went over the target, not the link
    assert AttentionStore.load(target).meta["note"] == "saved again"
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "missing" / "s.safetensors")  # as for a plain path,
    store.save(tmp_path / "dangling.safetensors")  # the folder it points into is made
    assert AttentionStore.load(tmp_path / "missing" / "s.safetensors").meta["note"] == "saved again"
