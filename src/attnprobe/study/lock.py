"""One run at a time per study folder: ``FolderLock``."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import ConfigError

__all__ = ["FolderLock"]


class FolderLock:
    """One run at a time per study folder: ``out/.lock`` holds the main process's pid and host while it runs.

    A lock left by a process that no longer runs (same host) is taken over; on another host it cannot be checked, so
    it is refused with the file to delete.

    Raises:
        ConfigError: another live run holds the folder, or the folder cannot be written to.
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / ".lock"
        self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> "FolderLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    self.path.unlink(missing_ok=True)  # left by a run that was killed
                    continue
                raise ConfigError(
                    f"{str(self.path.parent)!r} is in use by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('since')}): wait for it to end, or, if it is gone, "
                    f"delete {str(self.path)!r}"
                ) from None
            except OSError as exc:
                raise ConfigError(f"out {str(self.path.parent)!r} cannot be written to ({exc.strerror})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ConfigError(f"could not take {str(self.path)!r}: another run keeps taking it")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
