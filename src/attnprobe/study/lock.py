"""One run at a time per study folder: ``FolderLock``, an operating-system lock on ``out/.lock``.

The lock is the kernel's (``filelock.FileLock``: ``fcntl.flock`` on POSIX, ``msvcrt`` on Windows, a marker file with
the holder's pid where the file system has no locks), not the file's existence: a run killed in any way (``SIGKILL``,
out of memory, a node lost) releases it with its process, and two runs can never both hold it. Once it holds the
lock, the run writes its pid, host and start time to ``out/.lock.holder``, so that a run refused can say who holds
it.

    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> with FolderLock(folder):
    ...     try:
    ...         FolderLock(folder).__enter__()
    ...     except ConfigError as exc:
    ...         print("refused:", "is in use by another run (pid" in str(exc))
    refused: True
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import filelock

from .._atomic import write_atomic
from ..errors import ConfigError

__all__ = ["FolderLock"]


class FolderLock:
    """One run at a time per study folder: the main process holds an OS-level lock on ``out/.lock`` while it runs.

    A killed holder releases it by itself (the kernel drops the lock with the process); a ``.lock`` left behind, empty
    or written by an older attnprobe (a pid file), is taken like any other.

    Raises:
        ConfigError (a ValueError): another run holds the lock (the message says its pid, host and start time), or
            ``out/.lock`` cannot be opened (the message names it and the cause).
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / ".lock"
        self.holder = Path(out) / ".lock.holder"
        self._lock = filelock.FileLock(str(self.path), timeout=0)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> "FolderLock":
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise self._in_use() from None
        except OSError as exc:
            raise ConfigError(f"{str(self.path)!r} cannot be opened to lock the folder: "
                              f"{exc.strerror or exc}") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        with contextlib.suppress(OSError):  # it only names the holder: the lock holds where it cannot be written
            write_atomic(self.holder, json.dumps(me).encode())
        return self

    def _in_use(self) -> ConfigError:
        try:
            holder = json.loads(self.holder.read_text())
        except (OSError, ValueError):
            holder = {}
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
               if isinstance(holder, dict) and holder.get("pid") else "it has not said who yet")
        return ConfigError(f"{str(self.path.parent)!r} is in use by another run ({who}): wait for it to end")

    def __exit__(self, *exc) -> None:
        """Release the lock; never raises (a folder turned read-only leaves the files behind, unlocked)."""
        if not self.held:
            return
        with contextlib.suppress(OSError):
            self.holder.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._lock.release()
