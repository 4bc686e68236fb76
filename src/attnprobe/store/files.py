"""A store on disk: one safetensors file (``AttentionStore.save``) or a streamed folder (``probe(stream_to=...)``,
``attnprobe.store.shards``), each with a JSON header of coordinates and metadata. No pickle is involved.

The header (``header``) holds the format version, the sites, calls and samples (``attnprobe.store.records``), every
sample's token layout, the flat sites, the kept token positions, the store's id and the metadata. A saved file also
carries an integrity record (``attnprobe.store.integrity``). ``load`` reads either form back, verifies the checksums
and checks the maps against the header; every problem is a ``StoreError`` naming the file, and a failed write or read
a ``StoreIOError`` naming the path and the cause.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from .._atomic import atomic_path, link_target
from ..errors import ArgumentError, ArgumentTypeError, StoreError, warn
from ..text.tokens import TokenLayout
from .integrity import (INTEGRITY_KEY, check_coordinates, check_relations, check_shapes, check_values, file_record,
                        model_nan, open_header, parse_record, verify_file, verify_shard, warn_model_nan)
from .shards import HEADER, io_error, read_shard, shard_paths
from .records import Call, Sample, Site

__all__ = ["FORMAT_VERSION", "MISSING_CALLS", "json_safe", "header", "save", "load"]

FORMAT_VERSION = 1
#: what ``load`` does with a streamed store whose shards have a gap: ``"error"`` refuses, ``"skip"`` loads the rest
MISSING_CALLS = ("error", "skip")
_META_KEY = "attnprobe"
#: the name of a relation's tensor in a saved file: ``relation/<relation>/<module>``
_RELATION = "relation/"


def json_safe(value):
    """``value`` with every dict key a string and every leaf a JSON scalar (other objects as their ``str``)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def header(store) -> dict:
    """A store's JSON header: format, store id, sites, calls, samples, token layouts, flat sites, token positions,
    metadata."""
    return {
        "format": FORMAT_VERSION,
        "store_id": store.store_id,
        "sites": [asdict(s) for s in store.sites],
        "calls": [asdict(c) for c in store.calls],
        "samples": [asdict(s) for s in store.samples],
        "layouts": [store.layout(s.index).to_dict() for s in store.samples],
        "flat_sites": sorted(store.flat_sites),
        "token_positions": store.token_positions,
        "meta": store.meta,
    }


def _as_path(path, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise ArgumentTypeError(f"{what} takes a file or folder path (a str or pathlib.Path), got "
                                f"{type(path).__name__} {path!r}")
    return Path(path)


def _starts_with_brace(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(256).lstrip()
    except OSError:
        return False
    # a safetensors file starts with its header's length, 8 bytes little-endian: the high ones are 0
    return head[:1] == b"{" and b"\x00" not in head[:8]


def save(store, path) -> Path:
    """Write ``store`` to one safetensors file (maps) with its JSON header and integrity record, atomically. See
    ``AttentionStore.save``."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    given, path = path, _as_path(path, "store.save")
    given = os.fspath(given)
    if path.is_dir():
        raise StoreError(f"{str(path)!r} is a folder; give a file name such as {str(path / 'store.safetensors')!r}")
    if isinstance(given, str) and given.endswith(("/", os.sep)):  # Path() drops the separator, making it a file name
        raise StoreError(f"{given!r} ends with a path separator, as a folder does; give a file name such as "
                         f"{str(path / 'store.safetensors')!r}")
    if isinstance(given, str) and os.path.basename(given) in (".", ".."):  # Path("out/.") is Path("out")
        raise StoreError(f"{given!r} names a folder ({os.path.basename(given)!r}); give a file name such as "
                         f"{os.path.join(given, 'store.safetensors')!r}")
    tensors = {name: store[name].contiguous() for name in store.site_names}
    tensors.update({f"{_RELATION}{relation}/{module}": m.contiguous()
                    for relation, maps in store.relations.items() for module, m in maps.items()})
    text = json.dumps(header(store))
    record = file_record(text, tensors)
    warn_model_nan(model_nan(json.loads(record)))
    metadata = {_META_KEY: text, INTEGRITY_KEY: record}
    try:
        link_target(path).parent.mkdir(parents=True, exist_ok=True)  # the folder a link points into
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except (OSError, SafetensorError) as exc:
        raise io_error(path, "save the store to", exc) from exc
    return path


def load(cls, path, verify: bool = True, missing_calls: str = "error"):
    """Read a store of class ``cls`` (``AttentionStore``) from a file or a streamed folder. See ``AttentionStore.load``."""
    from safetensors import safe_open

    path = _as_path(path, "AttentionStore.load")
    if missing_calls not in MISSING_CALLS:
        raise ArgumentError(f"missing_calls={missing_calls!r} is not one of {MISSING_CALLS}")
    if path.is_dir():
        return _open_folder(cls, path, verify, missing_calls)
    if not path.is_file():
        raise StoreError(f"no store file or folder at {str(path)!r}")
    if path.name == HEADER and _starts_with_brace(path):  # JSON, where a safetensors file starts with its length
        raise StoreError(f"{str(path)!r} is the header of a streamed store: load its folder, "
                         f"AttentionStore.load({str(path.parent)!r})")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            header_text = metadata.get(_META_KEY)
            if header_text is None:
                raise StoreError(f"{str(path)!r} is a safetensors file but not an attnprobe store (no header)")
            maps = {k: f.get_tensor(k) for k in f.keys()}
    except StoreError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt/truncated files
        raise StoreError(f"{str(path)!r} is not a readable attnprobe store (corrupt or truncated?): {exc}") from exc
    record = parse_record(path, metadata.get(INTEGRITY_KEY))
    if record is not None and verify:
        verify_file(path, record, header_text, maps)
    try:
        found = json.loads(header_text)
    except ValueError as exc:
        raise StoreError(f"{str(path)!r} has a header that is not JSON (corrupt or edited?): {exc}") from None
    if record is None and isinstance(found, dict) and "store_id" in found:  # only files with a record have an id
        raise StoreError(f"{str(path)!r} has a store id but no integrity record: the record was removed, so the file "
                         "was edited")
    relations = _relations(path, found, maps)
    store = _from_header(cls, path, found, maps)
    store.relations = relations
    n_calls = 1 if store.aggregate else len(store.calls)
    check_relations(path, store, n_calls, verify)
    if not store.calls and all(t.numel() == 0 for t in maps.values()):
        return store  # a probe whose block raised before any denoiser call
    check_shapes(path, store, {n: tuple(t.shape) for n, t in maps.items()}, n_calls)
    if verify:
        high = float(len(store.calls)) if store.aggregate == "sum" else 1.0
        own = model_nan(record)
        for name, t in maps.items():
            check_values(path, name, t, high=high, model_nan=name in own)
    return store


def _relations(path: Path, found, maps: dict) -> dict:
    """Take the relations' tensors out of a file's ``maps``: ``relation -> module -> map``."""
    relations: dict = {}
    for name in [n for n in maps if n.startswith(_RELATION)]:
        relation, _, module = name[len(_RELATION):].partition("/")
        relations.setdefault(relation, {})[module] = maps.pop(name)
    return relations


def _from_header(cls, path: Path, found, maps: dict, folder: Path | None = None, shards=()):
    if not isinstance(found, dict) or "format" not in found:
        raise StoreError(f"{str(path)!r} is not an attnprobe store: its header (JSON "
                         f"{type(found).__name__}) has no store format")
    if found.get("format") != FORMAT_VERSION:
        raise StoreError(f"{str(path)!r} has store format {found['format']!r}; this attnprobe reads {FORMAT_VERSION}")
    try:
        sites = [Site(**s) for s in found["sites"]]
        calls = [Call(**{**c, "layout": tuple(c["layout"])}) for c in found["calls"]]
        samples = [Sample(**s) for s in found["samples"]]
        layouts = [TokenLayout.from_dict(d) for d in found["layouts"]]
        meta, flat = dict(found["meta"]), list(found.get("flat_sites", ()))
        positions, store_id = found.get("token_positions"), found.get("store_id")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise StoreError(f"{str(path)!r} has a malformed header ({type(exc).__name__}: {exc}); edited by hand?") from None
    check_coordinates(path, sites, samples, layouts, positions, meta)
    return cls(sites, calls, samples, layouts, maps, meta, flat, positions, folder, shards=shards, store_id=store_id)


def _open_folder(cls, folder: Path, verify: bool, missing_calls: str):
    header_path = folder / HEADER
    try:
        found = json.loads(header_path.read_text())
    except FileNotFoundError:
        raise StoreError(
            f"{str(folder)!r} is a folder without {HEADER}: not a streamed attnprobe store "
            "(a file written by store.save() is opened by its file name)"
        ) from None
    except ValueError as exc:
        raise StoreError(f"{str(header_path)!r} is not valid JSON (edited by hand?): {exc}") from None
    except OSError as exc:
        raise io_error(header_path, "read the header", exc) from exc
    found = open_header(header_path, found)
    store_id = found.get("store_id") if isinstance(found, dict) else None
    listed = _from_header(cls, folder, found, {}, folder)
    high = float(len(listed.calls)) if listed.aggregate == "sum" else 1.0
    calls, paths, numbers = [], [], []
    first: dict | None = None
    for path in shard_paths(folder):  # the calls that finished, also after a crash
        text, record, shapes, _, maps = read_shard(path, maps=verify)
        record = parse_record(path, record)
        numbers.append(_shard_number(path, record, store_id))
        check_shapes(path, listed, shapes)
        first = first or shapes
        bad = [n for n in shapes if shapes[n] != first[n]]
        if bad:
            raise StoreError(f"{str(path)!r}: site {bad[0]} has shape {list(shapes[bad[0]])}, other shards "
                             f"{list(first[bad[0]])} (a shard of another store?)")
        if verify:
            if record is not None:
                verify_shard(path, record, text, maps)
            own = model_nan(record)
            for name, t in maps.items():
                check_values(path, name, t, token_major=True, high=high, model_nan=name in own)
        try:
            call = json.loads(text)
            calls.append(Call(**{**call, "layout": tuple(call["layout"])}))
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"{str(path)!r}: its call record is malformed ({exc}): damaged or edited") from None
        paths.append(path)
    complete = bool(listed.meta.get("complete"))
    missing = [] if listed.aggregate else _gap(folder, listed, numbers, complete, missing_calls)
    if listed.aggregate and len(paths) == 1:
        calls = listed.calls  # the header's: every call at the end of a complete run
    elif complete and calls != [c for n, c in enumerate(listed.calls) if n not in missing]:
        raise StoreError(
            f"{str(folder)!r}: its header lists {len(listed.calls)} calls {[c.index for c in listed.calls][:12]} but "
            f"calls/ holds {len(calls)} {[c.index for c in calls][:12]} (a shard deleted, copied or added)"
        )
    else:
        order = [(c.generation, c.index) for c in calls]
        if order != sorted(set(order)):
            raise StoreError(f"{str(folder)!r}: calls/ holds calls out of order or twice: {order[:12]}")
    return cls(listed.sites, calls, listed.samples, [listed.layout(s.index) for s in listed.samples], {},
               listed.meta, listed.flat_sites, listed.token_positions, folder, shards=paths, store_id=listed.store_id)


def _shard_number(path: Path, record: dict | None, store_id: str | None) -> int | None:
    """A shard's position in the recording (its file number), checked against its integrity record."""
    named = int(path.stem) if path.stem.isdigit() else None
    if record is None:
        if store_id is not None:
            raise StoreError(f"{str(path)!r} has no integrity record, but its store's header has one (store id "
                             f"{store_id}): a shard of another store, or an older attnprobe's; take it out of calls/")
        return named  # a store of attnprobe 0.2.0: no records at all
    if record.get("store_id") != store_id:
        raise StoreError(f"{str(path)!r} is a shard of another store (store id {record.get('store_id')}; this "
                         f"store's is {store_id}): copied from another streamed folder? Take it out of calls/")
    if record.get("shard") != named:
        raise StoreError(f"{str(path)!r} is shard {record.get('shard')} of its store, but its file name says "
                         f"{path.stem}: renamed or copied inside calls/; give it back its name or remove the copy")
    return named


def _gap(folder: Path, listed, numbers: list, complete: bool, missing_calls: str) -> list[int]:
    """The shard numbers missing between the first and the last shard (every call of the header, for a finished
    store): an error, or with ``missing_calls="skip"`` a warning and ``meta["missing_calls"]``."""
    known = [n for n in numbers if n is not None]
    total = len(listed.calls) if complete else max(known, default=-1) + 1
    missing = sorted(set(range(total)) - set(known))
    if not missing:
        return []
    files = [f"{n:08d}.safetensors" for n in missing[:12]]
    which = f"shards {missing[:12]} ({', '.join(files)})"
    if complete:
        which += f", denoiser calls {[listed.calls[n].index for n in missing][:12]}"
    what = (f"{str(folder)!r} lacks {len(missing)} of its {total} calls: {which}. Calls after them were recorded, "
            "so a shard was deleted or lost" if not complete else
            f"{str(folder)!r} lacks {len(missing)} of the {total} calls its header lists: {which}")
    if missing_calls == "error":
        if not known:
            raise StoreError(f"{what}; no shard of a call is left to load")
        ends = " and ".join(end for end, cut in (("first", missing[0] < min(known)), ("last", missing[-1] > max(known)))
                            if cut)
        if any(min(known) < n < max(known) for n in missing):
            harm = "join calls that are not consecutive"
        else:
            harm = f"leave out its {ends} calls unnoticed"
        raise StoreError(f"{what}; loading the rest would {harm}. AttentionStore.load(path, missing_calls='skip') "
                         "loads the other calls and lists the missing ones in store.meta['missing_calls']")
    warn(f"{what}; loaded without them (missing_calls='skip'): store.meta['missing_calls'] lists them")
    listed.meta["missing_calls"] = missing
    return missing
