"""The streamed store format: a folder with one safetensors shard per denoiser call, written as the calls finish.

    store/
      attnprobe.json             coordinates and metadata (sites, samples, token layouts, capture options), the
                                 store's random id (``store_id``) and a checksum of the rest (``integrity``)
      calls/00000000.safetensors one file per recorded denoiser call: one tensor per site,
                                 [token, sample, head, qh, qw] (token-major; a video store's: qt qh qw); in
                                 the file's metadata the call, and an integrity record: the store's id, the
                                 shard's number, checksums of call and maps

Why safetensors shards (and not zarr): safetensors is already attnprobe's file format and a dependency of
diffusers; a shard is written whole to a temporary name and renamed, so a crash never leaves a half-written
call; reads are memory-mapped, and ``get_slice`` reads only the requested rows. Token-major shards make the
common read — a concept's few token positions for every call — a contiguous read of a few rows per shard, not
a pass over the whole store. zarr would add a dependency for chunking that one file per call already gives.

``AttentionStore.load`` refuses a shard of another store (another id), a renamed shard, and a gap in the numbers
(a shard deleted between two others, or one a finished header lists) unless ``missing_calls="skip"``
(``attnprobe.store.integrity``).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Sequence

import torch

from .._atomic import atomic_path, write_atomic
from ..errors import StoreError, StoreIOError
from .integrity import INTEGRITY_KEY, model_nan, new_store_id, seal_header, shard_record, warn_model_nan

__all__ = ["HEADER", "ShardWriter", "shard_paths", "read_shard", "read_shard_call", "read_site", "io_error"]

HEADER = "attnprobe.json"
CALLS = "calls"
_CALL_KEY = "attnprobe_call"


def io_error(path, doing: str, exc: Exception) -> StoreIOError:
    """A ``StoreIOError`` for a failed read or write of ``path``: what was being done and the system's cause."""
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    hint = ""
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in cause or "StorageFull" in cause:
        hint = " (the disk is full: free space or choose another folder; files written before are kept)"
    err = StoreIOError(f"cannot {doing} {str(path)!r}: {cause}{hint}")
    err.errno = getattr(exc, "errno", None)
    return err


class ShardWriter:
    """Writes one shard per denoiser call into ``folder/calls``; holds nothing once a shard is written.

    Each shard carries its call record and an integrity record (``attnprobe.store.integrity``): the store's id
    ``store_id`` (also in the folder's header), its number, and checksums of its call record and maps.

    Raises:
        StoreError: ``folder`` is a file, or a folder that is not empty (a store is never overwritten).
    """

    def __init__(self, folder, store_id: str | None = None) -> None:
        self.folder = Path(folder)
        self.store_id = store_id or new_store_id()
        if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
            what = "a file" if not self.folder.is_dir() else "a folder that is not empty"
            raise StoreError(
                f"stream_to={str(self.folder)!r} is {what}: give a new or empty folder (a store is never overwritten)"
            )
        self.count = 0  # the folder is made when the first pipeline call starts, not before the probe opens
        self.nan_sites: set[str] = set()  # sites already said to hold the model's own NaN (warned once each)

    def write(self, call: dict, maps: dict[str, torch.Tensor]) -> Path:
        """Write one call's maps (``site -> [sample, head, qh, qw, token]``; a video store's ``[sample, head, qt, qh,
        qw, token]``) as a token-major shard.

        Raises:
            StoreIOError: the shard could not be written (full disk, permission): the shards before it are kept.
        """
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = self.folder / CALLS / f"{self.count:08d}.safetensors"
        tensors = {site: t.movedim(-1, 0).contiguous() for site, t in maps.items()}  # token-major
        text = json.dumps(call)
        record = shard_record(self.store_id, self.count, text, tensors)
        new_nan = [site for site in model_nan(json.loads(record)) if site not in self.nan_sites]
        if new_nan:
            self.nan_sites.update(new_nan)
            warn_model_nan(new_nan)
        try:
            (self.folder / CALLS).mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={_CALL_KEY: text, INTEGRITY_KEY: record})
        except (OSError, SafetensorError) as exc:
            raise io_error(path, "write the shard", exc) from exc
        self.count += 1
        return path

    def write_header(self, header: dict) -> None:
        """Write the folder's header (with ``store_id`` and its checksum), atomically.

        Raises:
            StoreIOError: it could not be written (the previous header is kept).
        """
        path = self.folder / HEADER
        try:
            (self.folder / CALLS).mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(seal_header({**header, "store_id": self.store_id})).encode())
        except OSError as exc:
            raise io_error(path, "write the header", exc) from exc


def shard_paths(folder: Path) -> list[Path]:
    """The finished shards of a streamed store, in call order (temporary files of a crash are ignored)."""
    return sorted(p for p in (folder / CALLS).glob("*.safetensors") if not p.name.startswith(".") and p.is_file())


def read_shard(path: Path, maps: bool = False) -> tuple[str, str | None, dict, dict, dict | None]:
    """A shard's call record and integrity record (JSON text; ``None`` for a shard of attnprobe 0.2.0), each site's
    shape (``[sample, head, qh, qw, token]``) and dtype, and with ``maps=True`` its maps as stored
    (``site -> [token, sample, head, qh, qw]``), else ``None``.

    Raises:
        StoreError: not a shard (no call record), or unreadable (corrupt, truncated).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            record = metadata.get(_CALL_KEY)
            if record is None:
                raise StoreError(f"{str(path)!r} is a safetensors file without an attnprobe call record (a file "
                                 "written by store.save()? Keep other files out of a streamed store's calls/ folder)")
            shapes, dtypes = {}, {}
            for site in f.keys():
                sl = f.get_slice(site)
                token, *rest = sl.get_shape()
                shapes[site] = (*rest, token)
                dtypes[site] = sl.get_dtype()
            tensors = {site: f.get_tensor(site) for site in f.keys()} if maps else None
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{str(path)!r} is not a readable attnprobe shard (corrupt or truncated?): {exc}") from exc
    return record, metadata.get(INTEGRITY_KEY), shapes, dtypes, tensors


def read_shard_call(path: Path) -> tuple[dict, dict[str, tuple[int, ...]], dict[str, str]]:
    """A shard's call record, and each site's shape (``[sample, head, qh, qw, token]``) and dtype, without
    reading its maps."""
    record, _, shapes, dtypes, _ = read_shard(path)
    try:
        return json.loads(record), shapes, dtypes
    except ValueError as exc:
        raise StoreError(f"{str(path)!r}: its call record is not JSON (damaged or edited): {exc}") from None


def read_site(
    paths: Sequence[Path], site: str, samples: Sequence[int] | None = None, tokens: Sequence[int] | None = None
) -> torch.Tensor:
    """One site's maps from the given shards: ``[call, sample, head, qh, qw, token]``.

    Only the rows of the requested token positions are read from each shard (one contiguous range from the
    smallest to the largest requested position); ``samples`` and ``tokens`` index the stored axes.
    """
    from safetensors import safe_open

    out = []
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                sl = f.get_slice(site)
                if tokens is None:
                    t = sl[:]
                elif not tokens:
                    token, *rest = sl.get_shape()
                    t = torch.empty((0, *rest))
                else:
                    lo, hi = min(tokens), max(tokens) + 1
                    t = sl[lo:hi]
                    t = t[[p - lo for p in tokens]] if list(tokens) != list(range(lo, hi)) else t
        except Exception as exc:
            raise StoreError(f"{str(path)!r}: cannot read site {site} (corrupt or truncated shard?): {exc}") from exc
        if samples is not None:
            t = t[:, list(samples)]
        out.append(t.movedim(0, -1))  # → [sample, head, qh, qw, token] (video: qt qh qw)
    if not out:
        return torch.empty(0)
    try:
        return torch.stack(out).contiguous()
    except RuntimeError:
        shapes = {str(p.name): tuple(t.shape) for p, t in zip(paths, out)}
        raise StoreError(f"site {site}: the shards disagree on its shape {shapes} (edited or mixed stores?)") from None
