"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences as they grow (pure Python)."""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def num_blocks_needed(self, seq, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq, num_new_tokens: int) -> None:
        for _ in range(self.num_blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._free.popleft())

    def free(self, seq) -> None:
        self._free.extend(seq.block_table)
        seq.block_table.clear()
