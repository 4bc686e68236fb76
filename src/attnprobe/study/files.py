"""A study folder's files: a merge that never loses a table, the temporary files of killed runs, file-system errors.

A merge writes every new table and figure under a temporary name beside the file it replaces (``Staged.write``), and
only when all of them are complete renames each over its old one (``Staged.commit``): a run killed, or a disk that
fills, before that keeps every table and figure of the previous merge as it was; killed during the renames, each
file is whole, the previous merge's or the new one's, and the next run merges again. Files the new merge no longer
writes are removed only after its own are in place (``remove_unlisted``).

    >>> import tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp())
    >>> _ = (out / "auc.csv").write_text("old")
    >>> with Staged() as staged:
    ...     _ = staged.write(out / "auc.csv", b"new")
    ...     (out / "auc.csv").read_text()          # the old one stays until every new one is written
    ...     _ = staged.commit()
    'old'
    >>> (out / "auc.csv").read_text(), sorted(p.name for p in out.iterdir())
    ('new', ['auc.csv'])
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from .._atomic import discard, is_temporary, temporary_path
from ..errors import StoreIOError

__all__ = ["Staged", "remove_unlisted", "remove_temporaries", "writing", "FATAL_ERRNOS"]

#: Causes that no other cell would escape (a full disk or quota, a read-only file system): they end the run at once.
FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@contextlib.contextmanager
def writing(path, doing: str = "cannot be written", then: str = "") -> Iterator[None]:
    """``with writing(path):`` turns an ``OSError`` of the block into a ``StoreIOError`` naming ``path`` and the cause
    (full disk, read-only folder, missing directory, no permission); ``then``: what was kept and what to do, appended
    (to a ``StoreIOError`` of the block too)."""
    try:
        yield
    except OSError as exc:
        error = exc if isinstance(exc, StoreIOError) else StoreIOError.of(exc, path, doing)
        if then:
            error.args = (f"{error.args[0]}; {then}",)
        raise error from None


class Staged:
    """Files written under temporary names, renamed over their targets together by ``commit``.

    Leaving the ``with`` block without ``commit`` (an error, an interrupt) removes every temporary file written and
    leaves every target as it was.

    Raises:
        StoreIOError (a StoreError and an OSError): a file cannot be written or renamed; the message names it and the
            cause, and the targets not yet renamed are left as they were.
    """

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (temporary, target), in the order written

    def write(self, path, data: bytes) -> Path:
        """Write ``data`` (bytes) under ``path``'s temporary name (its folder created); returns ``path``."""
        path = Path(path)
        tmp = temporary_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        except OSError as exc:
            discard(tmp)
            raise StoreIOError.of(exc, path) from None
        self.staged.append((tmp, path))
        return path

    def commit(self) -> list[Path]:
        """Rename every written file over its target, in the order written; returns the targets."""
        done = []
        while self.staged:
            tmp, path = self.staged[0]
            with writing(path, "cannot be replaced"):
                os.replace(tmp, path)
            self.staged.pop(0)
            done.append(path)
        return done

    def __enter__(self) -> "Staged":
        return self

    def __exit__(self, *exc) -> None:
        for tmp, _ in self.staged:
            discard(tmp)
        self.staged.clear()


def remove_unlisted(out: Path, names, keep, folder: str = "figures") -> None:
    """After a merge: remove the files of ``names`` in ``out`` and every file under ``out/<folder>`` that are not in
    ``keep`` (paths this merge wrote), and the folders left empty. Never raises: a file that cannot be removed stays."""
    out = Path(out)
    keep = {Path(p) for p in keep}
    for name in names:
        if out / name not in keep:
            _remove(out / name)
    root = out / folder
    if not root.is_dir():
        return
    for parent, dirs, files in os.walk(root, topdown=False):
        for name in files:
            if Path(parent) / name not in keep and not is_temporary(name):
                _remove(Path(parent) / name)
        try:
            os.rmdir(parent)  # only when empty
        except OSError:
            pass


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def remove_temporaries(out: Path, parts) -> int:
    """Remove the temporary files (``.<name>.<pid>.tmp``) that killed runs left in ``out`` and under its study
    ``parts`` (``cells``, ``manifest``…: not the rest of a folder the user shares with the study). Call it holding
    the folder's lock, so that no live run's file is among them. Returns how many were removed; never raises."""
    out = Path(out)
    found = [out / n for n in _names(out) if is_temporary(n)]
    for part in parts:
        if (out / part).is_dir():
            found += [Path(p) / n for p, _, names in os.walk(out / part) for n in names if is_temporary(n)]
    removed = 0
    for path in found:
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []
