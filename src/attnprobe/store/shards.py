"""The streamed store format: a folder with one safetensors shard per denoiser call, written as the calls finish.

    store/
      attnprobe.json             coordinates and metadata (sites, samples, token layouts, capture options)
      calls/00000000.safetensors one file per recorded denoiser call: one tensor per site,
                                 [token, sample, head, qh, qw] (token-major), the call in the file's metadata

Why safetensors shards (and not zarr): safetensors is already attnprobe's file format and a dependency of
diffusers; a shard is written whole to a temporary name and renamed, so a crash never leaves a half-written
call; reads are memory-mapped, and ``get_slice`` reads only the requested rows. Token-major shards make the
common read — a concept's few token positions for every call — a contiguous read of a few rows per shard, not
a pass over the whole store. zarr would add a dependency for chunking that one file per call already gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .._atomic import atomic_path, write_atomic
from ..errors import StoreError

__all__ = ["HEADER", "ShardWriter", "shard_paths", "read_shard_call", "read_site"]

HEADER = "attnprobe.json"
CALLS = "calls"
_CALL_KEY = "attnprobe_call"


class ShardWriter:
    """Writes one shard per denoiser call into ``folder/calls``; holds nothing once a shard is written.

    Raises:
        StoreError: ``folder`` is a file, or a folder that is not empty (a store is never overwritten).
    """

    def __init__(self, folder) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
            what = "a file" if not self.folder.is_dir() else "a folder that is not empty"
            raise StoreError(
                f"stream_to={str(self.folder)!r} is {what}: give a new or empty folder (a store is never overwritten)"
            )
        self.count = 0  # the folder is made when the first pipeline call starts, not before the probe opens

    def write(self, call: dict, maps: dict[str, torch.Tensor]) -> Path:
        """Write one call's maps (``site -> [sample, head, qh, qw, token]``) as a token-major shard."""
        from safetensors.torch import save_file

        (self.folder / CALLS).mkdir(parents=True, exist_ok=True)
        path = self.folder / CALLS / f"{self.count:08d}.safetensors"
        tensors = {site: t.permute(4, 0, 1, 2, 3).contiguous() for site, t in maps.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={_CALL_KEY: json.dumps(call)})
        self.count += 1
        return path

    def write_header(self, header: dict) -> None:
        (self.folder / CALLS).mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / HEADER, json.dumps(header).encode())


def shard_paths(folder: Path) -> list[Path]:
    """The finished shards of a streamed store, in call order (temporary files of a crash are ignored)."""
    return sorted(p for p in (folder / CALLS).glob("*.safetensors") if not p.name.startswith(".") and p.is_file())


def read_shard_call(path: Path) -> tuple[dict, dict[str, tuple[int, ...]], dict[str, str]]:
    """A shard's call record, and each site's shape (``[sample, head, qh, qw, token]``) and dtype, without
    reading its maps."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            record = (f.metadata() or {}).get(_CALL_KEY)
            if record is None:
                raise StoreError(f"{str(path)!r} is a safetensors file without an attnprobe call record (a file "
                                 "written by store.save()? Keep other files out of a streamed store's calls/ folder)")
            call = json.loads(record)
            shapes, dtypes = {}, {}
            for site in f.keys():
                sl = f.get_slice(site)
                token, *rest = sl.get_shape()
                shapes[site] = (*rest, token)
                dtypes[site] = sl.get_dtype()
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{str(path)!r} is not a readable attnprobe shard (corrupt or truncated?): {exc}") from exc
    return call, shapes, dtypes


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
        out.append(t.permute(1, 2, 3, 4, 0))  # → [sample, head, qh, qw, token]
    if not out:
        return torch.empty(0)
    try:
        return torch.stack(out).contiguous()
    except RuntimeError:
        shapes = {str(p.name): tuple(t.shape) for p, t in zip(paths, out)}
        raise StoreError(f"site {site}: the shards disagree on its shape {shapes} (edited or mixed stores?)") from None
