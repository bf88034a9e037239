"""CUDA graphs of whole decode steps, one per batch-size bucket and kind of step (no adapter, or either
kernel of the adapter expand).

A decode step of an 8B model launches hundreds of small kernels; replaying a captured graph
removes the Python and launch time between them. Every input lives in a static buffer that the
graph reads: token ids, positions, KV slot mapping, block tables, context lengths, and the
per-token adapter slots with their grouping (SlotIndex). Activating an adapter only copies into
the slot stacks, so hot-swaps never re-capture. A batch is padded up to its bucket with dummy
sequences that write into a scratch KV block and use no adapter. Graphs of the tile kernel come in variants by
the step's tile count (TILE_CAPS), so its grid fits the step: 64 tokens over 8 adapters make 8 tiles, and the
grid that serves any step of 64 tokens has 21.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from adapters.staging import HostStaging
from server.engine.attention import DecodeMetadata

log = logging.getLogger(__name__)


TILE_CAPS = (4, 8, 12, 16)
"""Tile counts a decode graph of the tile kernel is also captured for (below the bucket's most, which is always
one): a step replays the graph of the fewest tiles that holds it. PICA_TILE_GRAPHS=one keeps only the one that
serves every step (benchmarks compare the two)."""


def graph_buckets(max_batch: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(buckets + [max_batch]))


class DecodeGraphs:
    KINDS = ("base", "tiles", "per_token")
    """A graph per bucket and kind of step: no adapter, or either kernel of the expand (SlotIndex.per_token)."""

    def __init__(self, runner, max_batch: int):
        self.runner = runner
        self.buckets = graph_buckets(max_batch)
        dev, b, width = runner.device, max_batch, runner.max_blocks_per_seq
        # all static inputs in one int64 buffer, filled by one copy from pinned staging (double-buffered: step
        # N+1's inputs are staged while step N's copy may still be queued)
        self._buffer = torch.zeros(b * (4 + width), dtype=torch.long, device=dev)
        self._staging = HostStaging(self._buffer, dev)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = self._buffer[: 4 * b].view(4, b)
        self.block_tables = self._buffer[4 * b :].view(b, width)
        self.max_batch = max_batch
        self.rows = torch.arange(max_batch, dtype=torch.long, device=dev)
        self._graphs: dict[tuple[int, str, int | None], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        """(bucket, kind, tile cap: None for the graph that serves any step of the bucket) -> graph, its logits."""
        self._caps: dict[int, list[int]] = {}

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def _forward(self, bucket: int) -> torch.Tensor:
        meta = DecodeMetadata(self.runner.kv_caches, self.slot_mapping[:bucket], self.block_tables[:bucket],
                              self.context_lens[:bucket], self.runner.block_size)
        return self.runner.forward(self.input_ids[:bucket], self.positions[:bucket], meta, self.rows[:bucket])

    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self._fill(self.runner.decode_inputs([], pad_to=max(self.buckets)))
        index = self.runner.adapted.slot_index
        caps = () if os.environ.get("PICA_TILE_GRAPHS") == "one" else TILE_CAPS
        for bucket in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            most = index.max_tiles(bucket, self.runner.adapted.slot_stacks.num_slots)
            self._caps[bucket] = [cap for cap in caps if cap < most]
            for kind in self.KINDS:
                for cap in (self._caps[bucket] if kind == "tiles" else []) + [None]:
                    index.set([-1 if kind == "base" else 0] * bucket, per_token=kind == "per_token")
                    index.tile_cap = cap
                    try:
                        self._graphs[(bucket, kind, cap)] = self._capture(bucket, pool)
                    finally:
                        index.tile_cap = None
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (buckets %s) in %.1fs", len(self._graphs), self.buckets,
                 time.perf_counter() - start)

    def _capture(self, bucket: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles, allocator settles
            self._forward(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self._forward(bucket)
        return graph, logits

    def graph_for(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The bucket's graph for the step the slot index was last set for: of its kind, and for the tile kernel
        the variant of the fewest tiles that holds the step's."""
        kind = self.kind()
        tiles = self.runner.adapted.slot_index.num_tiles_host
        cap = next((c for c in self._caps[bucket] if tiles <= c), None) if kind == "tiles" else None
        return self._graphs[(bucket, kind, cap)]

    def _fill(self, inputs, device_tokens=None) -> None:
        """Copy a step's inputs into the static buffers (one host-to-device copy). With device_tokens the token
        column's first entries are rows of device_tokens.tokens, gathered into input_ids on the device after the copy."""
        n, b = len(inputs.token_ids), self.max_batch
        staging = self._staging.next()
        columns = staging[: 4 * b].reshape(4, b)
        for row, values in enumerate((inputs.token_ids, inputs.positions, inputs.slot_mapping, inputs.context_lens)):
            columns[row, :n] = values
        staging[4 * b :].reshape(b, -1)[:n] = inputs.block_tables
        self._staging.copy_to(self._buffer)
        if device_tokens is not None:
            ids = self.input_ids[: len(device_tokens.rows)]
            ids.copy_(device_tokens.tokens.index_select(0, ids))

    def kind(self) -> str:
        """The kind of the step the slot index was last set for."""
        index = self.runner.adapted.slot_index
        return "base" if not index.any_adapter else "per_token" if index.per_token else "tiles"

    def replay_seconds(self, num_seqs: int, iters: int = 20) -> float:
        """GPU time of one decode step with no host work between steps (benchmarks): replays the graph of the
        last step's bucket and kind on the inputs already in the static buffers."""
        graph, _ = self.graph_for(self.bucket_for(num_seqs))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    def run(self, scheduled, device_tokens=None) -> torch.Tensor:
        """Replay the bucket's graph for these decoding sequences; logits [len(scheduled), V] (the graph's own
        output: the next replay overwrites it)."""
        bucket = self.bucket_for(len(scheduled))
        inputs = self.runner.decode_inputs(scheduled, pad_to=bucket, device_tokens=device_tokens)
        self._fill(inputs, device_tokens)
        self.runner.adapted.slot_index.set(inputs.token_slots)
        graph, logits = self.graph_for(bucket)
        graph.replay()
        return logits[0, : len(scheduled)]
