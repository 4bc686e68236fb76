"""Atomic file writes: a reader (or a run killed half-way) never sees half a file.

Every file attnprobe writes — a saved store, a streamed store's shards and header, a study's cells, manifests,
tables and figures — goes through ``atomic_path``: the data is written to a temporary name in the same folder, then
renamed over the target (``os.replace``, atomic on POSIX and Windows within one file system). On any failure the
temporary file is removed and the target is left as it was; a temporary file of a process killed before it could
remove it (``.<name>.<pid>.tmp``, ``is_temporary``) is removed by the next study run in that folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "write_atomic", "temporary_path", "is_temporary", "discard", "link_target"]

#: ours (``.<name>.<pid>.tmp``), and the ``.tmpXXXXXXXX`` that safetensors' ``save_file`` writes beside its target
#: (through Python's ``tempfile``) before renaming it over ours: a run killed during that write leaves it
_TEMPORARY = re.compile(r"^(\..+\.\d+\.tmp|\.tmp[A-Za-z0-9_]{6,8})$")


def temporary_path(path) -> Path:
    """The temporary name ``atomic_path`` writes ``path`` under: ``.<name>.<pid>.tmp`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of ``temporary_path``'s (``.<name>.<pid>.tmp``) or one safetensors writes first
    (``.tmpXXXXXXXX``)."""
    return bool(_TEMPORARY.match(name))


def discard(path) -> None:
    """Remove a temporary file if it is there; a failure to remove it (a read-only folder) never hides the error
    that is being handled."""
    with contextlib.suppress(OSError):
        Path(path).unlink(missing_ok=True)


def link_target(path) -> Path:
    """``path``, or the file it points to when it is a symbolic link (followed to the end, also when dangling)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` (over the file a symbolic link ``path``
    points to) when the block ends without an error, removed in every case otherwise.

        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "table.csv"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("a,b\\n")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('a,b\\n', ['table.csv'])
    """
    path = link_target(path)  # a rename over a link would replace the link itself
    tmp = temporary_path(path)
    try:
        yield tmp
        _give_mode(tmp, path)
        os.replace(tmp, path)
    finally:
        discard(tmp)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_mode(tmp: Path, path: Path) -> None:
    """The written file gets the permissions of the file it replaces, or those a plain ``open(path, "w")`` gives
    (0o666 less the umask): safetensors' ``save_file`` writes a private (0o600) temporary file and renames it over
    ``tmp``, which would make a saved store unreadable to the rest of a group."""
    try:
        want = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        want = 0o666 & ~_umask()
    if stat.S_IMODE(tmp.stat().st_mode) != want:
        os.chmod(tmp, want)


def write_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (``atomic_path``); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
