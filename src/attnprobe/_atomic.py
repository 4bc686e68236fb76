"""Atomic file writes: a reader (or a run killed half-way) never sees half a file.

Every file attnprobe writes — a saved store, a streamed store's shards and header, a study's cells, manifests,
tables and figures — goes through ``atomic_path``: the data is written to a temporary name in the same folder, then
renamed over the target (``os.replace``, atomic on POSIX and Windows within one file system). On any failure the
temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "write_atomic"]


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without an error,
    removed in every case otherwise.

        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "table.csv"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("a,b\\n")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('a,b\\n', ['table.csv'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (``atomic_path``); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
