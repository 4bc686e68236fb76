"""What a store file must prove before it is read: checksums, the store's identity, and its header against its maps.

    >>> import torch
    >>> maps = {"site": torch.full((1, 1, 1, 2, 2, 3), 1 / 3)}
    >>> digest_maps(maps) == digest_maps({"site": maps["site"].clone()})
    True

Every file ``save`` writes and every shard of a streamed folder carries an integrity record (a JSON string in the
safetensors metadata, key ``attnprobe_integrity``):

- ``data``: a SHA-256 of every map (its name, dtype, shape and bytes, in name order). SHA-256 rather than BLAKE2b:
  with the SHA extensions of current x86 and ARM CPUs it is the faster of the two in ``hashlib``
  (``benchmarks/integrity.py`` measures both).
- ``header`` (a saved file) or ``call`` (a shard): a SHA-256 of the JSON header or call record as written.
- ``store_id`` and ``shard`` (a shard): the random id of the streamed store it belongs to (also in the folder's
  ``attnprobe.json``) and its position in the recording (its file number).
- ``nan``: the sites whose maps the model itself gave NaN in part of a map (its q or k not finite: diverged weights
  or inputs), which ``save`` and a streaming probe warn about when they write them.

A streamed folder's ``attnprobe.json`` carries ``store_id`` and ``integrity.header``, a SHA-256 of the rest of the
header (sorted-key JSON). Files written before these records existed (attnprobe 0.2.0) have none: they load without
them and without a warning (nothing is wrong with them, and a warning on every load of a kept file would only be
noise); the checks below still run on them.

``check_coordinates``, ``check_shapes`` and ``check_values`` compare a header with the maps: sample indices, token
positions, sites, shapes, and values (probabilities: finite, in ``[0, 1]``; ``[0, calls]`` for a sum over calls;
NaN only as whole samples of a call, how a probe records samples without a row, or anywhere at a site the verified
record's ``nan`` names). Every mismatch is a ``StoreError`` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets

import torch

from ..errors import StoreError, warn
from .records import RELATIONS

__all__ = ["check_relations", "HASH", "INTEGRITY_KEY", "new_store_id", "digest_text", "digest_maps", "file_record", "shard_record",
           "parse_record", "verify_file", "verify_shard", "seal_header", "open_header", "check_coordinates",
           "check_shapes", "check_values", "partial_nan", "model_nan", "warn_model_nan"]

HASH = "sha256"
INTEGRITY_KEY = "attnprobe_integrity"
#: how far above its largest legitimate value a stored probability may lie (relative; rounding of a float sum)
TOLERANCE = 1e-3
#: room for fp16 rounding in a sum over up to a few hundred tokens
SUM_TOLERANCE = 0.01


def new_store_id() -> str:
    """A random id for a new store (32 hex digits)."""
    return secrets.token_hex(16)


def digest_text(text: str) -> str:
    """The SHA-256 of a header or call record as written (hex)."""
    return hashlib.new(HASH, text.encode()).hexdigest()


def digest_maps(maps: dict[str, torch.Tensor]) -> str:
    """The SHA-256 of maps (hex): per site in name order, its name, dtype and shape, then its bytes (no copy of a
    contiguous CPU tensor)."""
    h = hashlib.new(HASH)
    for name in sorted(maps):
        t = maps[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def partial_nan(maps: torch.Tensor, token_major: bool = False) -> torch.Tensor | None:
    """Where a site's maps hold NaN in part of one map (a map: one call and sample, ``[head, qh, qw, token]``):
    ``[call, sample]`` booleans (``[sample]`` for a token-major shard, ``[token, sample, head, qh, qw]``), or ``None``
    when no value is NaN. A probe stores NaN for a whole map where a sample has no row in a call; NaN in part of one
    comes from the model itself (its q or k not finite), or from damage."""
    if not maps.is_floating_point() or not maps.numel() or not bool(maps.isnan().any()):
        return None
    nan = maps.isnan()
    per = nan.movedim(1, 0).reshape(nan.shape[1], -1) if token_major else nan.flatten(2)  # one row per map
    return per.any(-1) & ~per.all(-1)


def _model_nan(maps: dict[str, torch.Tensor], token_major: bool) -> list[str]:
    """The sites whose maps hold NaN in part of a map (``partial_nan``), in name order."""
    found = []
    for name in sorted(maps):
        partial = partial_nan(maps[name], token_major)
        if partial is not None and bool(partial.any()):
            found.append(name)
    return found


def file_record(header_text: str, maps: dict[str, torch.Tensor]) -> str:
    """The integrity record of a file ``save`` writes; ``nan``: the sites whose maps the model gave NaN in part of
    (``partial_nan``), which ``check_values`` then accepts."""
    return json.dumps({"hash": HASH, "header": digest_text(header_text), "data": digest_maps(maps),
                       "nan": _model_nan(maps, False)})


def shard_record(store_id: str, shard: int, call_text: str, maps: dict[str, torch.Tensor]) -> str:
    """The integrity record of shard number ``shard`` of streamed store ``store_id`` (token-major maps); ``nan``: as
    for ``file_record``."""
    return json.dumps({"hash": HASH, "store_id": store_id, "shard": shard, "call": digest_text(call_text),
                       "data": digest_maps(maps), "nan": _model_nan(maps, True)})


def warn_model_nan(sites: list[str]) -> None:
    """Say that maps being written hold the model's own NaN (``partial_nan``), which ``load`` accepts."""
    if sites:
        warn(f"sites {sites[:3]}{' …' if len(sites) > 3 else ''} hold NaN inside their maps: the model's own attention "
             "was not finite there (its q or k hold NaN or inf: diverged weights or inputs?). They are kept as "
             "recorded; the file's integrity record names them, so load() accepts them")


def model_nan(record: dict | None) -> list[str]:
    """The sites an integrity record says hold the model's own NaN (``file_record``)."""
    found = record.get("nan", []) if isinstance(record, dict) else []
    return [n for n in found if isinstance(n, str)] if isinstance(found, list) else []


def parse_record(path, text: str | None) -> dict | None:
    """A file's integrity record, or ``None`` for a file written before records existed.

    Raises:
        StoreError: the record is not JSON or names a hash this attnprobe does not know.
    """
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("hash") != HASH:
        shown = record.get("hash") if isinstance(record, dict) else text[:60]
        raise StoreError(f"{str(path)!r}: its integrity record is unreadable or names hash {shown!r} (this attnprobe "
                         f"writes {HASH!r}): the file was edited or damaged")
    return record


def _mismatch(path, what: str) -> StoreError:
    return StoreError(f"{str(path)!r}: the checksum of its {what} does not match the one written with it: the file "
                      "was changed after it was written (a damaged disk or copy, or an edit); restore it from a copy")


def verify_file(path, record: dict, header_text: str, maps: dict[str, torch.Tensor]) -> None:
    """Check a saved file's header and maps against its integrity record.

    Raises:
        StoreError: either checksum differs (names the file and which part).
    """
    if record.get("header") != digest_text(header_text):
        raise _mismatch(path, "header (coordinates and metadata)")
    if record.get("data") != digest_maps(maps):
        raise _mismatch(path, "maps (data)")


def verify_shard(path, record: dict, call_text: str, maps: dict[str, torch.Tensor]) -> None:
    """Check a shard's call record and maps against its integrity record.

    Raises:
        StoreError: either checksum differs.
    """
    if record.get("call") != digest_text(call_text):
        raise _mismatch(path, "call record")
    if record.get("data") != digest_maps(maps):
        raise _mismatch(path, "maps (data)")


def _canonical(header: dict) -> str:
    return json.dumps(header, sort_keys=True)


def seal_header(header: dict) -> dict:
    """A streamed folder's header with ``integrity.header``, the SHA-256 of the rest (sorted-key JSON)."""
    plain = json.loads(json.dumps({k: v for k, v in header.items() if k != "integrity"}))
    return {**plain, "integrity": {"hash": HASH, "header": digest_text(_canonical(plain))}}


def open_header(path, found) -> dict:
    """A streamed folder's header without its ``integrity`` entry, checked against it when it has one.

    Raises:
        StoreError: the checksum differs (the header was edited or damaged), names an unknown hash, or is missing
            from a header with a ``store_id`` (which only sealed headers have).
    """
    if isinstance(found, dict) and "integrity" not in found and "store_id" in found:  # only sealed headers have one
        raise StoreError(f"{str(path)!r}: the header has a store id but no integrity entry: it was removed, so the "
                         "header was edited")
    if not isinstance(found, dict) or "integrity" not in found:
        return found
    plain = {k: v for k, v in found.items() if k != "integrity"}
    record = found["integrity"]
    if not isinstance(record, dict) or record.get("hash") != HASH:
        raise StoreError(f"{str(path)!r}: its integrity entry is unreadable ({record!r}): the header was edited")
    if record.get("header") != digest_text(_canonical(plain)):
        raise _mismatch(path, "header (coordinates and metadata)")
    return plain


def check_coordinates(path, sites, samples, layouts, positions, meta: dict) -> None:
    """Check a header's coordinates against each other before a store is built from them.

    Args:
        sites, samples, layouts: the header's ``Site``, ``Sample`` and ``TokenLayout`` records.
        positions: the header's ``token_positions`` (``None`` or a list of prompt positions).
        meta: the header's metadata.

    Raises:
        StoreError: two sites of one name, a sample whose index is not its position, a layout per sample missing,
            token positions that are not distinct ints inside every sample's prompt, an unknown aggregate.
    """
    where = str(path)
    names = [s.name for s in sites]
    if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise StoreError(f"{where!r}: its header lists sites twice or not by name: {names[:12]}")
    for i, s in enumerate(samples):
        if s.index != i:
            raise StoreError(f"{where!r}: sample {i} of its header has index {s.index!r}; a sample's index is its "
                             f"position on the sample axis (0 to {len(samples) - 1}): the header was edited")
    if len(layouts) != len(samples):
        raise StoreError(f"{where!r} has {len(layouts)} token layouts for {len(samples)} samples")
    if positions is not None:
        keys = min((len(lay.strings) for lay in layouts), default=0)
        ok = isinstance(positions, list) and all(type(p) is int and 0 <= p < keys for p in positions)
        if not ok or len(set(positions)) != len(positions):
            raise StoreError(f"{where!r}: its header's token_positions {positions!r} are not distinct prompt "
                             f"positions from 0 to {keys - 1} (None keeps every position): the header was edited")
    capture = meta.get("capture") or {}
    if not isinstance(capture, dict) or capture.get("aggregate") not in (None, "sum", "mean"):
        raise StoreError(f"{where!r}: its header's capture options {capture!r} name no known aggregate")
    video = meta.get("video")
    if video is not None and not _video_record(video):
        raise StoreError(f"{where!r}: its header's video record {video!r} is not one a probe writes (qt and "
                         "latent_frames ints ≥ 1 with qt = latent_frames // pt, patch three ints ≥ 1, "
                         "temporal_compression an int ≥ 1 or None, frames the decoded count or None): the header was "
                         "edited")


def _video_record(video) -> bool:
    """Whether ``meta["video"]`` is consistent with itself (``attnprobe.capture.frames.video_meta`` writes it)."""
    if not isinstance(video, dict):
        return False
    qt, latent, patch, c = (video.get(k) for k in ("qt", "latent_frames", "patch", "temporal_compression"))
    whole = lambda v: type(v) is int and v >= 1  # noqa: E731
    if not (whole(qt) and whole(latent) and isinstance(patch, list) and len(patch) == 3 and all(map(whole, patch))
            and qt == latent // patch[0] and (c is None or whole(c))):
        return False
    frames, alone = video.get("frames"), video.get("first_frame_alone", True)
    return frames is None or (whole(c) and frames == ((latent - 1) * c + 1 if alone else latent * c))


def check_shapes(path, store, shapes: dict[str, tuple[int, ...]], calls: int | None = None) -> None:
    """Check each site's map shape against the header that ``store`` was built from: ``[call, sample, head, qh, qw,
    token]`` with ``calls`` calls (a saved file), or ``[sample, head, qh, qw, token]`` when ``calls`` is ``None``
    (a shard, one call); a video store (``meta["video"]``) has ``qt qh qw`` in place of ``qh qw``, ``qt`` the
    header's.

    Raises:
        StoreError: a map of a site the header does not list (or none for a site it lists), another number of
            calls, samples, latent frames or token positions, more heads than the site has.
    """
    where = str(path)
    extra = sorted(set(shapes) - set(store.site_names))
    missing = [n for n in store.site_names if n not in shapes]
    if missing:
        raise StoreError(f"{where!r} lacks the maps of sites {missing[:5]} (truncated or edited?)")
    if extra:
        raise StoreError(f"{where!r} holds maps of {len(shapes)} sites, but its header lists {len(store.sites)}: "
                         f"{extra[:5]} are not in it (the header was edited, or maps of another store added)")
    heads = {s.name: s.heads for s in store.sites}
    video = store.meta.get("video")
    grid = 3 if video else 2  # qt qh qw, or qh qw
    for name, full in shapes.items():
        shape = full if calls is None else full[1:]
        ok = (calls is None or (len(full) == grid + 4 and full[0] == calls)) and len(shape) == grid + 3
        ok = ok and shape[0] == len(store.samples) and shape[-1] == store.n_tokens
        ok = ok and 1 <= shape[1] <= max(heads[name], 1) and (not video or shape[2] == video["qt"])
        if not ok:
            lead = "" if calls is None else f"{calls} calls, "
            axes = f"{video['qt']} qt, qh, qw" if video else "qh, qw"
            raise StoreError(f"{where!r}: site {name} has shape {list(full)}, expected [{lead}{len(store.samples)} "
                             f"samples, head (≤ {heads[name]}), {axes}, {store.n_tokens} tokens] from its header: the "
                             "header was edited, or the maps belong to another store")


def check_values(path, site: str, maps: torch.Tensor, token_major: bool = False, high: float = 1.0,
                 model_nan: bool = False) -> None:
    """Check that stored probabilities are probabilities: finite, in ``[0, high]`` (``high`` = 1, or the number of
    calls of a sum over calls) up to ``TOLERANCE``; NaN only where a whole sample of a call is NaN (how a probe
    records a sample without a row in that call), unless ``model_nan``.

    Args:
        maps: one site's maps, ``[call, sample, head, qh, qw, token]``, or one shard's ``[token, sample, head, qh,
            qw]`` with ``token_major=True`` (a video store's: ``qt qh qw`` in place of ``qh qw``).
        model_nan: the file's verified integrity record says the model gave this site NaN in part of a map (its q or
            k not finite): NaN is then accepted anywhere, the other values checked.

    Raises:
        StoreError: a value outside the range, an infinity, a NaN in part of a sample's map, a query whose values
            over the tokens sum to more than ``high`` (+1%), or a dtype that is not a 16-, 32- or 64-bit float.
    """
    if not maps.is_floating_point() or maps.dtype.itemsize < 2:  # float8 has no aminmax, and no probe stores it
        raise StoreError(f"{str(path)!r}: site {site} holds {maps.dtype} values, but attnprobe stores probabilities as "
                         "float16, bfloat16, float32 or float64: the maps were replaced")
    if not maps.numel():
        return
    lo, hi = (float(v) for v in torch.aminmax(maps))  # NaN propagates: one pass over the maps when there is none
    has_nan = math.isnan(lo) or math.isnan(hi)
    if has_nan:
        partial = partial_nan(maps, token_major)
        if not model_nan and bool(partial.any()):
            at = partial.nonzero()[0].tolist()
            what = f"sample {at[0]}" if token_major else f"(call, sample) {tuple(at)}"
            raise StoreError(f"{str(path)!r}: site {site} has NaN in part of the map of {what} (a probe stores NaN "
                             "only for the whole map of a sample without a row, and its integrity record names no "
                             "NaN of the model's own there): the maps are damaged")
        finite = maps[~maps.isnan()]
        if not finite.numel():
            return
        lo, hi = (float(v) for v in torch.aminmax(finite))
    if not (lo >= -TOLERANCE * high and hi <= high * (1 + TOLERANCE)):
        raise StoreError(f"{str(path)!r}: site {site} holds values from {lo:.6g} to {hi:.6g}, but its maps are "
                         f"probabilities in [0, {high:g}]: the maps are damaged or not attention probabilities")
    # a query's probabilities over the stored tokens sum to at most 1 (a subset of tokens, or a joint block's text
    # share: less); the sum in the maps' dtype (torch accumulates fp16 in fp32 on the CPU), rounding allowed for
    summed = (maps if not has_nan else torch.nan_to_num(maps, nan=0.0)).sum(0 if token_major else -1)
    most = float(summed.max())
    if most > high * (1 + SUM_TOLERANCE):
        raise StoreError(f"{str(path)!r}: site {site} has maps whose values over the tokens sum to {most:.6g}, but a "
                         f"query's probabilities sum to at most {high:g}: the maps are damaged or not attention "
                         "probabilities")


def check_relations(path, store, n_calls: int, verify: bool) -> None:
    """Check a loaded store's relations (``store.relations``, ``probe(relations=...)``) against its header
    (``meta["relations"]``): the relations and the modules each was read at, and per map its calls, samples, heads,
    query axis (the points; the kept tokens) and key axes (the module's grid; every text key); with ``verify``, its
    values (probabilities, each query's row summing to at most 1 over its keys).

    Raises:
        StoreError: a header that is not a relations record, a relation or module the header does not list (or one it
            lists missing), a map of another shape, values that are not probabilities.
    """
    where, record = str(path), store.meta.get("relations")
    if not store.relations and record is None:
        return
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in (
            ("relations", list), ("points", list), ("modules", dict), ("read", dict))):
        raise StoreError(f"{where!r}: its header's relations record is malformed (edited?): {str(record)[:200]}")
    listed = {r: sorted(m) if isinstance(m, list) else m for r, m in record["read"].items()}
    found = {r: sorted(m) for r, m in store.relations.items()}
    if listed != found or not set(found) <= set(RELATIONS) or sorted(record["relations"]) != sorted(found):
        raise StoreError(f"{where!r}: its header lists relations {listed} but the file holds {found} (relations are "
                         f"any of {RELATIONS}): edited or damaged")
    samples, keys = len(store.samples), len(store.layout(0).strings) if store.samples else None
    heads = {s.name: s.heads for s in store.sites}
    for relation, maps in store.relations.items():
        for module, m in maps.items():
            info = record["modules"].get(module)
            grid = info.get("grid") if isinstance(info, dict) else None
            site = info.get("site") if isinstance(info, dict) else None
            if not isinstance(grid, list) or len(grid) != 2 or site not in heads:
                raise StoreError(f"{where!r}: relation {relation} of {module}: the header gives no grid and site for it")
            queries = len(record["points"]) if relation == "image->image" else store.n_tokens
            tail = [keys] if relation == "text->text" else grid
            want = [n_calls, samples, m.shape[2] if m.dim() > 2 and m.shape[2] in (1, heads[site]) else heads[site],
                    queries, *tail]
            if list(m.shape) != want:
                raise StoreError(f"{where!r}: relation {relation} of {module} has shape {list(m.shape)}, but the header "
                                 f"says {want} ([call, sample, head, {'point' if relation == 'image->image' else 'token'}"
                                 f", {'key' if relation == 'text->text' else 'kh, kw'}])")
            if relation == "image->image" and len(info.get("cells") or []) != queries:
                raise StoreError(f"{where!r}: relation {relation} of {module}: the header places "
                                 f"{len(info.get('cells') or [])} cells for its {queries} points")
            if verify:
                check_values(path, f"{module} ({relation})", m if relation == "text->text" else m.flatten(-2))
