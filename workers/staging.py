"""One host-to-device copy per step for all of a step's small input arrays.

A step's inputs (token ids, positions, slots, block tables, sampling parameters) are a dozen small
numpy arrays. Uploading each on its own costs a pinned allocation, a copy and an event apiece on
the host (tens of microseconds together, and the host is what sets the pace of small models). Here they are packed
into one pinned buffer and sent with one copy; the device tensors are views into one device buffer.

Reuse is safe without a sync on the hot path: there are two pinned buffers, used in turn, and one
is written only after the copy that last read it has completed (its event); the device buffer is
rewritten by a copy that the stream orders after every kernel of the step that read it.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16


class HostStaging:
    def __init__(self, device: torch.device, capacity: int = 1 << 20) -> None:
        self.device = device
        self._capacity = 0
        self._turn = 0
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        if self._capacity:  # buffers in flight must not be freed under their copies
            torch.cuda.current_stream(self.device).synchronize()
        self._capacity = capacity
        self._host = [torch.empty(capacity, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self._host_np = [h.numpy() for h in self._host]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._dev = torch.empty(capacity, dtype=torch.uint8, device=self.device)

    def upload(self, named: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Device tensors with the arrays' contents, dtypes and shapes, by the arrays' names (valid
        for this step)."""
        arrays = list(named.values())
        sizes = [-(-a.nbytes // _ALIGN) * _ALIGN for a in arrays]
        total = sum(sizes)
        if total > self._capacity:
            self._grow(max(total, 2 * self._capacity))
        turn = self._turn
        self._turn ^= 1
        event = self._events[turn]
        if event is not None:
            event.synchronize()  # the copy that last read this buffer (two steps ago: done by now)
        host = self._host_np[turn]
        offset = 0
        spans = []
        for array, size in zip(arrays, sizes):
            n = array.nbytes
            host[offset : offset + n].view(array.dtype)[:] = array.reshape(-1)
            spans.append((offset, n, array))
            offset += size
        self._dev[:offset].copy_(self._host[turn][:offset], non_blocking=True)
        event = self._events[turn] = self._events[turn] or torch.cuda.Event()
        event.record()
        return {
            name: self._dev[o : o + n].view(_TORCH_DTYPES[a.dtype.str]).view(a.shape)
            for name, (o, n, a) in zip(named, spans)
        }


_TORCH_DTYPES = {
    np.dtype(np.int64).str: torch.int64,
    np.dtype(np.int32).str: torch.int32,
    np.dtype(np.float32).str: torch.float32,
    np.dtype(np.bool_).str: torch.bool,
}
