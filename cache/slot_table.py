"""GPU slots: which adapter version sits in which slot of the preallocated stacks (pure bookkeeping).

A slot used by a running sequence is pinned and never evicted; unpinned resident slots form an
LRU from which the oldest is evicted when a new adapter needs a slot. Evicting is bookkeeping only:
the next activation overwrites the slot with one copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

AdapterKey = tuple  # (adapter_id, version)
BASE_SLOT = -1
"""The slot of a token that uses no adapter (the base model)."""


@dataclass
class CacheStats:
    """Hit, miss and eviction counts of one residency tier (host cache or GPU slots)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class SlotTable:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.slot_to_adapter_key: list[AdapterKey | None] = [None] * num_slots
        self._slot_of: dict[AdapterKey, int] = {}
        self._num_pins = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._unpinned_lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.stats = CacheStats()

    def slot_of(self, key: AdapterKey) -> int | None:
        return self._slot_of.get(key)

    def num_pins(self, slot: int) -> int:
        return self._num_pins[slot]

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    @property
    def num_pinned(self) -> int:
        return sum(1 for n in self._num_pins if n)

    def can_admit(self, key: AdapterKey) -> bool:
        return key in self._slot_of or bool(self._free) or bool(self._unpinned_lru)

    def admit(self, key: AdapterKey) -> tuple[int, bool]:
        """Pin a slot for key; returns (slot, needs_load). Call only when can_admit(key)."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self.stats.hits += 1
            self._unpinned_lru.pop(slot, None)
            self._num_pins[slot] += 1
            return slot, False
        self.stats.misses += 1
        if self._free:
            slot = self._free.pop()
        else:
            slot, _ = self._unpinned_lru.popitem(last=False)
            del self._slot_of[self.slot_to_adapter_key[slot]]
            self.stats.evictions += 1
        self.slot_to_adapter_key[slot] = key
        self._slot_of[key] = slot
        self._num_pins[slot] = 1
        return slot, True

    def release(self, slot: int) -> None:
        """Unpin once; a slot with no pins left becomes the most recently used eviction candidate."""
        assert self._num_pins[slot] > 0, f"slot {slot} released more often than admitted"
        self._num_pins[slot] -= 1
        if self._num_pins[slot] == 0:
            self._unpinned_lru[slot] = None

    def drop(self, adapter_id: str) -> None:
        """Forget the unpinned slots of a deleted adapter id (pinned ones finish their requests first)."""
        for key, slot in list(self._slot_of.items()):
            if key[0] == adapter_id and self._num_pins[slot] == 0:
                self._unpinned_lru.pop(slot, None)
                del self._slot_of[key]
                self.slot_to_adapter_key[slot] = None
                self._free.append(slot)
