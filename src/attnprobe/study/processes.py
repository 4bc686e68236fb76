"""A study's processes: one, or those of ``accelerate launch`` (``torchrun``), which agree through accelerate's
``PartialState``: they read the manifests, wait for each other, and each takes every ``world``-th pending cell.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from ..errors import ConfigError

__all__ = ["Processes", "processes", "WAIT_HOURS"]


class Processes:
    """This process's place among the study's processes (one, or those of ``accelerate launch``)."""

    def __init__(self, state=None) -> None:
        self.state = state
        self.rank = state.process_index if state is not None else 0
        self.world = state.num_processes if state is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The device accelerate gives this process (``None`` in a one-process run)."""
        return self.state.device if self.state is not None else None

    def wait(self) -> None:
        """Wait for every process (a barrier; nothing in a one-process run)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, items: list) -> list:
        """This process's part of ``items``: every ``world``-th, from its rank."""
        return items[self.rank::self.world]


def processes() -> Processes:
    """The study's processes: accelerate's ``PartialState`` when launched with ``WORLD_SIZE`` > 1, else one.

    Raises:
        ConfigError: launched as several processes but accelerate is not installed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Processes()
    try:
        from accelerate import PartialState
    except ImportError:
        raise ConfigError(
            f"this study was launched as {world} processes (WORLD_SIZE={world}) but accelerate is not installed: "
            "pip install 'attnprobe[scale]'"
        ) from None
    # without an accelerator (or with ACCELERATE_USE_CPU), accelerate makes a gloo group only when told cpu=True
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    # the processes wait for each other before the merge, however unequal their shares turn out: no 30-minute limit
    from accelerate.utils import InitProcessGroupKwargs

    return Processes(PartialState(cpu=cpu, **InitProcessGroupKwargs(timeout=timedelta(hours=WAIT_HOURS)).to_kwargs()))


#: How long a process waits for the others at a barrier (hours) before the run fails.
WAIT_HOURS = 72
