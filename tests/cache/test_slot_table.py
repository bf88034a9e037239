from cache.slot_table import SlotTable

A, B, C = ("a", "v1"), ("b", "v1"), ("c", "v1")


def test_admit_release_hit_miss_evict():
    t = SlotTable(2)
    assert t.admit(A) == (0, True) and t.admit(B) == (1, True)
    assert (t.stats.hits, t.stats.misses) == (0, 2)
    assert not t.can_admit(C), "both slots are pinned"
    assert t.admit(A) == (0, False) and t.num_pins(0) == 2
    t.release(0)
    t.release(0)
    t.release(1)
    assert t.num_pinned == 0 and t.num_resident == 2
    # LRU among unpinned: slot 0 was released first, so it goes first
    assert t.can_admit(C) and t.admit(C) == (0, True)
    assert t.stats.evictions == 1 and t.slot_of(A) is None and t.slot_to_adapter_key == [C, B]
    assert t.admit(B) == (1, False)  # still resident: a hit, no load


def test_pinned_slot_is_never_evicted():
    t = SlotTable(1)
    t.admit(A)
    assert not t.can_admit(B)
    t.release(0)
    assert t.admit(B) == (0, True)


def test_new_version_is_a_new_key_and_drop_frees_unpinned():
    t = SlotTable(3)
    old, new = ("a", "v1"), ("a", "v2")
    t.admit(old)
    t.admit(new)
    t.release(1)  # v2 unpinned, v1 still used by a running request
    t.drop("a")
    assert t.slot_of(old) == 0 and t.slot_of(new) is None
    assert t.admit(B) == (1, True)  # the freed slot is reused without an eviction
    assert t.stats.evictions == 0


def test_rank_pages_bound_residency_and_are_freed_with_their_slot():
    """Four slots but eight pages: an adapter of six pages evicts the least recently used until its pages are free,
    never a pinned one, and each slot's pages are its own."""
    t = SlotTable(4, num_pages=8)
    D = ("d", "v1")
    assert t.admit(A, 2) == (0, True) and t.admit(B, 1) == (1, True) and t.admit(C, 4) == (2, True)
    held = [t.pages_of(s) for s in range(3)]
    assert sorted(p for pages in held for p in pages) == list(range(7)) and t.num_free_pages == 1
    assert not t.can_admit(D, 6), "only one page is free and every slot is pinned"
    t.release(1)
    t.release(0)  # B is now the least recently used, then A; C stays pinned
    assert not t.can_admit(D, 5), "B's and A's pages and the free one make four"
    assert t.can_admit(D, 4)
    slot, needs_load = t.admit(D, 4)
    assert needs_load and t.stats.evictions == 2 and t.slot_of(A) is None and t.slot_of(B) is None
    assert t.slot_of(C) == 2 and slot != 2
    assert len(t.pages_of(slot)) == 4 and not set(t.pages_of(slot)) & set(t.pages_of(2)) and t.num_free_pages == 0
    assert t.admit(C, 4) == (2, False)  # a hit takes no pages
    t.release(2)
    t.release(2)
    t.drop("c")
    assert t.num_free_pages == 4 and t.pages_of(2) == []
