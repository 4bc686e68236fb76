"""One run at a time per study folder: ``FolderLock``, an operating-system lock on ``out/.lock``.

The lock is the kernel's (``fcntl.flock``; ``msvcrt.locking`` on Windows), not the file's existence: a run killed in any
way (``SIGKILL``, out of memory, a node lost) releases it with its process, and two runs can never both hold it. The
holder writes its pid, host and start time into the file once it holds the lock, so that a run refused can say who
holds it.

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
import sys
import time
from pathlib import Path

from ..errors import ConfigError

__all__ = ["FolderLock"]

if sys.platform == "win32":  # pragma: no cover - the tests run on Linux
    import msvcrt

    _FAR = 1 << 30  # the byte locked, past any holder text: Windows locks are mandatory, so readers can still read

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _FAR, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _FAR, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


#: What a holder writes in the lock file, so that a pid file of attnprobe ≤ 0.2.0 can be told apart from it.
_KIND = "flock"


class FolderLock:
    """One run at a time per study folder: the main process holds an OS-level lock on ``out/.lock`` while it runs.

    A killed holder releases it by itself (the kernel drops the lock with the process); what its file still says is
    then overwritten by the next holder, and an empty ``.lock`` (a run killed while taking it) is taken like any other.
    A ``.lock`` written by attnprobe ≤ 0.2.0 (a pid file) whose process still runs on this host is respected. The
    file is removed when the lock is released (where the folder allows it; it does no harm if it stays).

    Raises:
        ConfigError (a ValueError): another run holds the lock (the message says its pid, host and start time), or
            ``out/.lock`` cannot be opened or locked (the message names it and the cause).
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / ".lock"
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> "FolderLock":
        for _ in range(20):  # the file is replaced only by a holder's release: a few tries are enough
            fd = self._open()
            if not _try_lock(fd):
                holder = _read(fd)
                os.close(fd)
                raise self._in_use(holder)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the file we locked was removed by a holder's release: lock the one now there
                _unlock(fd)
                os.close(fd)
                continue
            old = _read(fd)
            if old.get("kind") != _KIND and old.get("host") == socket.gethostname() and _alive(old.get("pid")):
                _unlock(fd)
                os.close(fd)
                raise self._in_use(old)  # a pid file of attnprobe ≤ 0.2.0, whose run still goes on
            self.fd = fd
            self._write_holder()
            return self
        raise ConfigError(f"could not take {str(self.path)!r}: other runs keep taking and releasing it; try again")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"{str(self.path)!r} cannot be opened to lock the folder: "
                              f"{exc.strerror or exc}") from None

    def _in_use(self, holder: dict) -> ConfigError:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}" if holder.get("pid")
               else "it has not said who yet")
        return ConfigError(f"{str(self.path.parent)!r} is in use by another run ({who}): wait for it to end")

    def _write_holder(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "kind": _KIND}
        data = json.dumps(me).encode()
        try:  # the text only names the holder: the lock holds even where it cannot be written
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.write(self.fd, data)
            os.ftruncate(self.fd, len(data))
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        """Release the lock; never raises (a folder turned read-only leaves the file behind, unlocked)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            self.path.unlink()  # still holding it: a run that opened this file finds it gone and opens the new one
        with contextlib.suppress(OSError):
            _unlock(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


def _read(fd: int) -> dict:
    """The holder text of an open lock file (``{}`` when empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid) -> bool:
    """Whether ``pid`` runs on this host (``False`` on Windows, where ``os.kill`` would end it)."""
    if sys.platform == "win32" or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
