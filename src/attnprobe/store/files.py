"""A store on disk: one safetensors file (``AttentionStore.save``) or a streamed folder (``probe(stream_to=...)``,
``attnprobe.store.shards``), each with a JSON header of coordinates and metadata. No pickle is involved.

The header (``header``) holds the format version, the sites, calls and samples (``attnprobe.store.records``), every
sample's token layout, the flat sites, the kept token positions and the metadata. ``load`` reads either form back and
checks the maps against the header; every problem is a ``StoreError`` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .._atomic import atomic_path
from ..errors import StoreError
from ..text.tokens import TokenLayout
from .shards import HEADER, read_shard_call, shard_paths
from .records import Call, Sample, Site

__all__ = ["FORMAT_VERSION", "json_safe", "header", "save", "load"]

FORMAT_VERSION = 1
_META_KEY = "attnprobe"


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
    """A store's JSON header: format, sites, calls, samples, token layouts, flat sites, token positions, metadata."""
    return {
        "format": FORMAT_VERSION,
        "sites": [asdict(s) for s in store.sites],
        "calls": [asdict(c) for c in store.calls],
        "samples": [asdict(s) for s in store.samples],
        "layouts": [store.layout(s.index).to_dict() for s in store.samples],
        "flat_sites": sorted(store.flat_sites),
        "token_positions": store.token_positions,
        "meta": store.meta,
    }


def save(store, path) -> Path:
    """Write ``store`` to one safetensors file (maps) with its JSON header, atomically. See ``AttentionStore.save``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{str(path)!r} is a folder; give a file name such as {str(path / 'store.safetensors')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: store[name].contiguous() for name in store.site_names}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(header(store))})
    return path


def load(cls, path):
    """Read a store of class ``cls`` (``AttentionStore``) from a file or a streamed folder. See ``AttentionStore.load``."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        return _open_folder(cls, path)
    if not path.is_file():
        raise StoreError(f"no store file or folder at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header_text = (f.metadata() or {}).get(_META_KEY)
            if header_text is None:
                raise StoreError(f"{str(path)!r} is a safetensors file but not an attnprobe store (no header)")
            found = json.loads(header_text)
            maps = {k: f.get_tensor(k) for k in f.keys()}
    except StoreError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt/truncated files
        raise StoreError(f"{str(path)!r} is not a readable attnprobe store (corrupt or truncated?): {exc}") from exc
    store = _from_header(cls, path, found, maps)
    n_calls = 1 if store.aggregate else len(store.calls)
    missing = [s.name for s in store.sites if s.name not in maps]
    if missing:
        raise StoreError(f"{str(path)!r} lacks the maps of sites {missing[:5]} (truncated or edited?)")
    for name, t in maps.items():
        if not store.calls and t.numel() == 0:
            continue  # a probe whose block raised before any denoiser call
        if t.ndim != 6 or t.shape[0] != n_calls or t.shape[1] != len(store.samples):
            raise StoreError(
                f"{str(path)!r}: site {name} has shape {tuple(t.shape)}, expected "
                f"[{n_calls} calls, {len(store.samples)} samples, head, qh, qw, token]"
            )
    return store


def _from_header(cls, path: Path, found, maps: dict, folder: Path | None = None):
    if not isinstance(found, dict) or found.get("format") != FORMAT_VERSION:
        version = found.get("format") if isinstance(found, dict) else type(found).__name__
        raise StoreError(f"{str(path)!r} has store format {version!r}; this attnprobe reads {FORMAT_VERSION}")
    try:
        sites = [Site(**s) for s in found["sites"]]
        calls = [Call(**{**c, "layout": tuple(c["layout"])}) for c in found["calls"]]
        samples = [Sample(**s) for s in found["samples"]]
        layouts = [TokenLayout.from_dict(d) for d in found["layouts"]]
        meta, flat = dict(found["meta"]), list(found.get("flat_sites", ()))
        positions = found.get("token_positions")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise StoreError(f"{str(path)!r} has a malformed header ({type(exc).__name__}: {exc}); edited by hand?") from None
    if len(layouts) != len(samples):
        raise StoreError(f"{str(path)!r} has {len(layouts)} token layouts for {len(samples)} samples")
    return cls(sites, calls, samples, layouts, maps, meta, flat, positions, folder)


def _open_folder(cls, folder: Path):
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
    listed = _from_header(cls, folder, found, {}, folder)
    calls, paths = [], []
    first: dict | None = None
    for path in shard_paths(folder):  # the calls that finished, also after a crash
        call, shapes, _ = read_shard_call(path)
        missing = [s.name for s in listed.sites if s.name not in shapes]
        if missing:
            raise StoreError(f"{str(path)!r} lacks the maps of sites {missing[:5]} (edited by hand?)")
        first = first or shapes
        bad = [n for n in shapes if shapes[n] != first.get(n) or shapes[n][0] != len(listed.samples)]
        if bad:
            raise StoreError(
                f"{str(path)!r}: site {bad[0]} has shape {list(shapes[bad[0]])}, other shards "
                f"{list(first.get(bad[0], ()))} and the header {len(listed.samples)} samples (a shard of another store?)"
            )
        calls.append(Call(**{**call, "layout": tuple(call["layout"])}))
        paths.append(path)
    if listed.aggregate and len(paths) == 1:
        calls = listed.calls  # the header's: every call at the end of a complete run
    elif listed.meta.get("complete") and calls != listed.calls:
        raise StoreError(
            f"{str(folder)!r}: its header lists {len(listed.calls)} calls {[c.index for c in listed.calls][:12]} but "
            f"calls/ holds {len(calls)} {[c.index for c in calls][:12]} (a shard deleted, copied or added)"
        )
    else:
        order = [(c.generation, c.index) for c in calls]
        if order != sorted(set(order)):
            raise StoreError(f"{str(folder)!r}: calls/ holds calls out of order or twice: {order[:12]}")
    return cls(listed.sites, calls, listed.samples, [listed.layout(s.index) for s in listed.samples], {},
               listed.meta, listed.flat_sites, listed.token_positions, folder, shards=paths)
