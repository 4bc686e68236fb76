"""Where a probe's maps go once a denoiser call has finished: ``CallSink``.

Maps computed on a GPU for a CPU store travel through pinned host buffers without a per-site synchronisation; a
running aggregate (``probe(aggregate=...)``) is kept on the compute device. The store is written only through its
``StoreWriter`` (``attnprobe.store``).
"""

from __future__ import annotations

from collections import deque

import torch

from ..store import StoreWriter
from .processor import lasting

__all__ = ["CallSink", "AGGREGATES", "IN_FLIGHT"]

#: device → host copies in flight (denoiser calls) before the probe waits for the oldest
IN_FLIGHT = 2

AGGREGATES = ("sum", "mean")


class CallSink:
    """Where each finished denoiser call's maps go: the store (its memory or streamed folder, through its
    ``StoreWriter``), or a running aggregate.

    ``put(call, maps)`` takes ``site -> [sample, head, qh, qw, token]`` on the device they were computed on
    (fp32 with an aggregate, else the store's dtype). Maps computed on a GPU for a CPU store are copied into
    pinned host buffers without waiting (``non_blocking``), and reach the store once a CUDA event says the copy is
    done: the probe never synchronises per site, and per call only when more than ``IN_FLIGHT`` calls are in
    flight. ``close`` waits for the rest and writes the aggregate.
    """

    def __init__(self, writer: StoreWriter, device: torch.device, aggregate: str | None) -> None:
        self.writer, self.device, self.aggregate = writer, device, aggregate
        self.pending: deque = deque()  # (event, call, host maps) whose device → host copies are in flight
        self.sums: dict[str, torch.Tensor] = {}  # running fp32 sums per site, on the compute device
        self.summed: list = []

    def put(self, call, maps: dict[str, torch.Tensor]) -> None:
        if self.aggregate:
            for site, m in maps.items():
                if site not in self.sums:  # a sum of its own (not a view of another call's), writable in any mode
                    self.sums[site] = lasting(m.shape, m.device, m.dtype).copy_(m)
                else:
                    self.sums[site].add_(m)
            self.summed.append(call)
            return
        if self.device.type == "cpu" and any(m.is_cuda for m in maps.values()):
            host = {}
            for site, m in maps.items():
                host[site] = torch.empty(m.shape, dtype=m.dtype, pin_memory=True)
                host[site].copy_(m, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((event, call, host))
            self.drain(IN_FLIGHT)
            return
        self._keep(call, maps)

    def drain(self, limit: int) -> None:
        """Hand on the calls whose copies are done; wait for the oldest while more than ``limit`` are in flight."""
        while self.pending and (len(self.pending) > limit or self.pending[0][0].query()):
            event, call, host = self.pending.popleft()
            event.synchronize()
            # into pageable memory, so that the pinned buffers go back to torch's host allocator for reuse
            self._keep(call, {site: torch.empty(m.shape, dtype=m.dtype).copy_(m) for site, m in host.items()})

    def _keep(self, call, maps: dict[str, torch.Tensor]) -> None:
        self.writer.append(call, {site: m.to(self.device) for site, m in maps.items()})

    def close(self, dtype: torch.dtype, layout: tuple[str, ...]) -> None:
        """Wait for the copies in flight; with an aggregate, put the sum (or mean) over the calls in the store."""
        self.drain(0)
        if not self.aggregate:
            return
        n = max(len(self.summed), 1)
        maps = {site: (m / n if self.aggregate == "mean" else m).to(dtype).to(self.device)
                for site, m in self.sums.items()}
        self.writer.set_aggregate(self.summed, maps, layout)
        self.sums.clear()
