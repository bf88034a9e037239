"""Rank pages: the GPU copies of adapter M's held in pages of a few rank columns, so a slot costs memory
in proportion to its own rank, not the widest one the server serves.

A group's pool is [num_pages + 1, out, page]: a slot's M [out, r] lies in ceil(r / page) pages, named in order by
the slot's row of the page table [num_slots, max_pages]. Every group shares that table (a slot takes its pages in
each group's pool; a group the adapter leaves alone, or adapts at a lower rank, holds zeros there), and the last
page of every pool is never written: table entries past a slot's own pages name it, so any column past a slot's
rank reads zero, as the zero padding of a dense [num_slots, out, max_rank] stack did. On a server of
`--max-rank 256`, an r=8 adapter takes one 16-column page where padding took 256 columns (vLLM pads every LoRA
slot to --max-lora-rank; S-LoRA pages by rank, as here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

RANK_PAGE = 16
"""Rank columns per page: 32 bytes per row in bf16, one DRAM sector, so reading a page wastes no bandwidth."""


def page_size_for(max_rank: int) -> int:
    """RANK_PAGE, or the next power of two >= max_rank where that is smaller (tiny test models)."""
    return min(RANK_PAGE, 1 << max(0, max_rank - 1).bit_length())


def pages_for_rank(rank: int, page: int) -> int:
    return -(-rank // page)


@dataclass
class PagedStack:
    """What one expand launch reads for the layers that share a GEMM (members): their M's row-wise in one pool."""

    pool: torch.Tensor
    """[num_pages + 1, num_out, page]: the members' M columns, page by page (the last page all zeros)."""
    signs: torch.Tensor
    """[num_pages + 1, num_layers, num_members * page]: the per-layer diagonal cores, paged like the pool."""
    ranks: torch.Tensor
    """[num_members, num_slots] int32: each slot's rank in each member (0: the member is left alone)."""
    page_table: torch.Tensor
    """[num_slots, max_pages] int32 on the device: the pages of each slot, in rank order."""
    host_table: np.ndarray
    """The same table on the host (the torch path gathers with it)."""
    rank: int
    """R: the z columns each member has in the GEMM output (the basis rank served)."""

    @property
    def page(self) -> int:
        return self.pool.shape[2]

    @property
    def num_members(self) -> int:
        return self.signs.shape[2] // self.page

    def dense(self, slot: int, num_pages: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M [num_out, R'], signs [num_layers, num_members * R']) of one slot, gathered from its first num_pages pages
        (all by default, R' = R; fewer give R' = num_pages * page, at most R): the dense operands the references use."""
        pages = torch.from_numpy(self.host_table[slot, : num_pages].astype(np.int64)).to(self.pool.device)
        width = min(self.rank, len(pages) * self.page)
        m = self.pool[pages].permute(1, 0, 2).reshape(self.pool.shape[1], -1)[:, :width]
        k = self.num_members
        signs = self.signs[pages].unflatten(2, (k, self.page)).permute(1, 2, 0, 3).reshape(self.signs.shape[1], k, -1)
        return m, signs[:, :, :width].reshape(self.signs.shape[1], k * width)
