"""Host cache: an LRU in RAM of adapters read from the store, ready for one copy into a GPU slot.

Cores are kept in the model dtype, in pinned memory when the model is on CUDA, so activating an
adapter is a single non-blocking host-to-device copy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cache.slot_table import CacheStats


@dataclass(frozen=True)
class AdapterHandle:
    """A resolved adapter version: running requests keep theirs even if the id is re-uploaded."""

    adapter_id: str
    version: str
    """The adapter file's checksum: (adapter_id, version) is the slot table key."""
    tensors: dict
    """Group -> M [out, r] on the host (pinned on CUDA)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.adapter_id, self.version)



class HostCache:
    def __init__(self, load_adapter: Callable, max_adapters: int, dtype: torch.dtype, pin_memory: bool):
        """load_adapter(adapter_id) -> validated Adapter; raises KeyError when the store has no such id."""
        self._load = load_adapter
        self.max_adapters = max_adapters
        self.dtype = dtype
        self.pin_memory = pin_memory
        self._entries: OrderedDict[str, AdapterHandle] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._entries

    def get(self, adapter_id: str, version: str | None = None) -> AdapterHandle:
        """The adapter's host-resident handle, read from the store on a miss. With `version` (the store's
        current checksum), a cached handle of another version is a miss: in a store shared by several
        replicas, a delete and re-upload through another replica is seen at the next request."""
        with self._lock:
            handle = self._entries.get(adapter_id)
            if handle is not None and version is not None and handle.version != version:
                handle = None
            if handle is not None:
                self._entries.move_to_end(adapter_id)
                self.stats.hits += 1
                return handle
        adapter = self._load(adapter_id)  # disk read outside the lock
        handle = self.handle_for(adapter_id, adapter)
        with self._lock:
            self.stats.misses += 1
            self._entries[adapter_id] = handle
            self._entries.move_to_end(adapter_id)
            while len(self._entries) > self.max_adapters:
                self._entries.popitem(last=False)
                self.stats.evictions += 1
        return handle

    def handle_for(self, adapter_id: str, adapter) -> AdapterHandle:
        return self.handle_from_tensors(adapter_id, adapter.checksum, adapter.slot_tensors())

    def handle_from_tensors(self, adapter_id: str, version: str, slot_tensors: dict) -> AdapterHandle:
        """A handle of slot tensors already made (benchmarks), in this cache's dtype and memory."""
        tensors = {}
        for name, t in slot_tensors.items():
            t = t.to(self.dtype).contiguous()
            tensors[name] = t.pin_memory() if self.pin_memory else t
        return AdapterHandle(adapter_id, version, tensors)

    def invalidate(self, adapter_id: str) -> None:
        with self._lock:
            self._entries.pop(adapter_id, None)
