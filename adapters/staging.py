"""Host staging for per-step host-to-device copies: two pinned buffers used in turn, each reused only once
the copy that last read it has run.

A copy from pinned memory with non_blocking=True returns before the device reads the buffer. With one
buffer, filling step N+1's inputs while step N's copy is still queued (the engine prepares N+1 while N
runs) would change N's inputs; with two, step N+1 writes the buffer step N-1 used, whose copy ran before
N-1's forward. An event per buffer makes that a check rather than an assumption: `next()` waits for it,
which costs nothing when the copy has run (the usual case) and is correct when it has not.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without waiting: a blocking `.to(cuda)` synchronizes the stream, so the host
    would wait for every step queued before (async scheduling's lookahead among them). Pinned and non-blocking
    instead; PyTorch's caching host allocator keeps the pinned copy until the device has read it."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostStaging:
    def __init__(self, like: torch.Tensor, device: torch.device):
        """Two host twins of `like` (pinned on CUDA), for copies into tensors of its shape and dtype."""
        cuda = device.type == "cuda"
        self._buffers = [torch.zeros(like.shape, dtype=like.dtype, pin_memory=cuda) for _ in range(2)]
        self._arrays = [b.numpy() for b in self._buffers]
        self._events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._recorded = [False, False]
        self._turn = 0

    def next(self) -> np.ndarray:
        """The buffer to fill for the next copy (a numpy view), once the copy that last read it has run."""
        self._turn ^= 1
        if self._recorded[self._turn]:
            self._events[self._turn].synchronize()
        return self._arrays[self._turn]

    def copy_to(self, dst: torch.Tensor) -> None:
        """Queue the copy of the buffer `next()` returned into dst (same shape) on the current stream."""
        dst.copy_(self._buffers[self._turn], non_blocking=True)
        event = self._events[self._turn]
        if event is not None:
            event.record()
            self._recorded[self._turn] = True
