"""GPU slots: which adapter version sits in which slot of the preallocated stacks, and which rank pages
(adapters.rank_pages) hold its M's (pure bookkeeping).

A slot used by a running sequence is pinned and never evicted; unpinned resident slots form an
LRU from which the oldest are evicted when a new adapter needs a slot or more free pages than there are.
Evicting is bookkeeping only: the next activation overwrites the slot and its pages with one copy.
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
    def __init__(self, num_slots: int, num_pages: int = 0):
        """num_pages: the rank pages the M pools hold in all (0: an adapter's pages are not tracked here)."""
        self.num_slots = num_slots
        self.num_pages = num_pages
        self.slot_to_adapter_key: list[AdapterKey | None] = [None] * num_slots
        self._slot_of: dict[AdapterKey, int] = {}
        self._num_pins = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._free_pages = list(range(num_pages - 1, -1, -1))
        self._pages: list[list[int]] = [[] for _ in range(num_slots)]
        self._unpinned_lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.stats = CacheStats()

    def slot_of(self, key: AdapterKey) -> int | None:
        return self._slot_of.get(key)

    def num_pins(self, slot: int) -> int:
        return self._num_pins[slot]

    def pages_of(self, slot: int) -> list[int]:
        """The rank pages the slot's adapter holds, in rank order."""
        return self._pages[slot]

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    @property
    def num_pinned(self) -> int:
        return sum(1 for n in self._num_pins if n)

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def can_admit(self, key: AdapterKey, num_pages: int = 0) -> bool:
        """Whether admit(key, num_pages) can run now: resident already, or a slot and num_pages pages that are free
        or held by unpinned slots."""
        if key in self._slot_of:
            return True
        if not (self._free or self._unpinned_lru):
            return False
        evictable = sum(len(self._pages[s]) for s in self._unpinned_lru) if num_pages > len(self._free_pages) else 0
        return num_pages <= len(self._free_pages) + evictable

    def admit(self, key: AdapterKey, num_pages: int = 0) -> tuple[int, bool]:
        """Pin a slot for key (with num_pages rank pages when it loads); returns (slot, needs_load). Call only when
        can_admit(key, num_pages)."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self.stats.hits += 1
            self._unpinned_lru.pop(slot, None)
            self._num_pins[slot] += 1
            return slot, False
        self.stats.misses += 1
        while not self._free or num_pages > len(self._free_pages):  # the least recently used go first
            oldest, _ = self._unpinned_lru.popitem(last=False)
            self._forget(oldest)
            self.stats.evictions += 1
        slot = self._free.pop()
        self._pages[slot] = [self._free_pages.pop() for _ in range(num_pages)]
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
                self._forget(slot)

    def _forget(self, slot: int) -> None:
        """Free an unpinned slot and its pages."""
        del self._slot_of[self.slot_to_adapter_key[slot]]
        self.slot_to_adapter_key[slot] = None
        self._free.append(slot)
        self._free_pages.extend(reversed(self._pages[slot]))
        self._pages[slot] = []
