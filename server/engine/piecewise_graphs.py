"""CUDA graphs of the pieces between attention calls, for steps with prompts (prefill and mixed steps).

Such a step's attention changes shape every step (its sequences' query and context lengths), but nothing else
in it does once the token count is fixed. Run eagerly, an 8B step with prompts costs 40-80 ms of host time
(about a thousand launches through Python), several times its GPU time, and the decodes sharing the step wait
for it. Here the step's tokens are padded up to a bucket, and each piece of the decoder between two attention
calls (server.engine.llama_decoder) replays a graph captured for that bucket and kind of step (no adapter, or
either kernel of the expand); only the attention runs eagerly, on the real tokens. With the fused kernels a
piece also writes its layer's K/V into the paged cache (rope_store, through a static slot buffer), so the eager
part of a layer is one attention launch writing into the pieces' buffer: the host launches a mixed step slower
than its GPU time otherwise (prefill-steps-h200-lookahead-admits.mixed-profile.txt: 64 `index_copy_` and 32
copies beside 32 attention launches a step). Pieces read and write static buffers sized for the largest bucket;
their temporaries live in one shared pool, reused piece after piece. Padded rows carry no adapter and write K/V
into the scratch block only; their outputs are never read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from adapters.layer import DECODE_MAX_TOKENS
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.llama_decoder import LlamaDecoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVWrites:
    """Where the pieces' rope_store writes K/V (stored_attention_inputs' `meta`): the paged caches, and a static
    slot buffer holding the step's slots in its first rows and the scratch block's first slot in every other."""

    kv_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts to capture: every 16 up to 256, every 64 up to 1024, then every 256, capped at max_tokens,
    which is always one. Padding costs compute: past ~150 tokens an 8B step's GEMMs are compute-bound (about
    27 us a token on the H200), so a 288-token step padded to 512 took 16.5 ms instead of ~9."""
    buckets = list(range(16, 257, 16)) + list(range(320, 1025, 64)) + list(range(1280, max_tokens, 256))
    return sorted({b for b in buckets if b < max_tokens} | {max_tokens})


class PrefillGraphs:
    """The piece graphs of every bucket and kind, their static buffers, and the replay of one step."""

    def __init__(self, runner, decoder: LlamaDecoder, max_tokens: int):
        self.runner, self.decoder = runner, decoder
        self.buckets = prefill_buckets(max_tokens)
        dev, dtype, m = runner.device, runner.dtype, max(self.buckets)
        d = decoder
        hidden_size = d.embed_tokens.weight.shape[1]
        self.token_ids = torch.zeros(m, dtype=torch.long, device=dev)
        self.positions = torch.zeros(m, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(m, hidden_size, dtype=dtype, device=dev)
        self.cos = torch.zeros(m, d.head_dim, dtype=dtype, device=dev)
        self.sin = torch.zeros(m, d.head_dim, dtype=dtype, device=dev)
        self.q = torch.zeros(m, d.num_heads, d.head_dim, dtype=dtype, device=dev)
        self.attended = torch.zeros(m, d.num_heads * d.head_dim, dtype=dtype, device=dev)
        self.scratch_slot = runner.scratch_block * runner.block_size
        self.kv_writes = self.k = self.v = None  # K/V go to the cache from the pieces, else through these buffers
        if d.rope_store is not None:
            self.kv_writes = KVWrites(runner.kv_caches, torch.full((m,), self.scratch_slot, dtype=torch.long, device=dev))
        else:
            self.k = torch.zeros(m, d.num_kv_heads, d.head_dim, dtype=dtype, device=dev)
            self.v = torch.zeros(m, d.num_kv_heads, d.head_dim, dtype=dtype, device=dev)
        self._graphs: dict[tuple[int, str], list[torch.cuda.CUDAGraph]] = {}
        self.steps_run = 0  # steps served by replays (tests, benchmarks)

    def bucket_for(self, num_tokens: int) -> int | None:
        return next((b for b in self.buckets if b >= num_tokens), None)

    def _piece(self, i: int, n: int) -> None:
        """Piece i of a step of n (bucket) tokens: after_attention of layer i - 1 (none for i = 0: the embedding),
        then attention_inputs of layer i (the final norm for i = num_layers), into the static buffers. The MLP
        output after_attention leaves pending is added inside the same piece (by the next norm)."""
        d = self.decoder
        pending = None
        if i == 0:
            hidden, cos, sin = d.embed(self.token_ids[:n], self.positions[:n])
            self.cos[:n].copy_(cos)
            self.sin[:n].copy_(sin)
        else:
            hidden, pending = d.after_attention(i - 1, self.hidden[:n], self.attended[:n])
        if i == d.num_layers:
            self.hidden[:n].copy_(d.final_norm(hidden, pending))
            return
        if self.kv_writes is not None:
            hidden, q = d.stored_attention_inputs(i, hidden, self.cos[:n], self.sin[:n], self.kv_writes, pending)
        else:
            hidden, q, k, v = d.attention_inputs(i, hidden, self.cos[:n], self.sin[:n], pending)
            self.k[:n].copy_(k)
            self.v[:n].copy_(v)
        self.hidden[:n].copy_(hidden)
        self.q[:n].copy_(q)

    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        slot_index = self.runner.adapted.slot_index
        for bucket in reversed(self.buckets):  # largest first, so the pool is sized once
            for kind in DecodeGraphs.KINDS:
                if kind == "per_token" and bucket > DECODE_MAX_TOKENS:  # SlotIndex never picks it there
                    continue
                slot_index.set([-1 if kind == "base" else 0] * bucket, per_token=kind == "per_token", with_prompts=True)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up: Triton compiles, allocator settles
                    for i in range(self.decoder.num_layers + 1):
                        self._piece(i, bucket)
                torch.cuda.current_stream().wait_stream(stream)
                graphs = []
                for i in range(self.decoder.num_layers + 1):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._piece(i, bucket)
                    graphs.append(graph)
                self._graphs[(bucket, kind)] = graphs
        torch.cuda.synchronize()
        log.info("captured %d prefill piece graphs (%d buckets up to %d tokens) in %.1fs",
                 sum(len(g) for g in self._graphs.values()), len(self.buckets), max(self.buckets),
                 time.perf_counter() - start)

    def graphs_for(self, bucket: int) -> list[torch.cuda.CUDAGraph] | None:
        """The bucket's piece graphs for the kind of step the slot index was last set for (None: not captured)."""
        index = self.runner.adapted.slot_index
        if index.per_token and not index.split:  # captured split (steps with prompts split the expand)
            return None
        kind = "base" if not index.any_adapter else "per_token" if index.per_token else "tiles"
        return self._graphs.get((bucket, kind))

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, meta, logits_rows: torch.Tensor,
            graphs: list[torch.cuda.CUDAGraph]) -> torch.Tensor:
        """A step of n real tokens (the slot index already set for its padded bucket) -> logits [1, rows, V]."""
        n, d = token_ids.shape[0], self.decoder
        self.steps_run += 1
        self.token_ids[:n].copy_(token_ids)
        self.positions[:n].copy_(positions)
        stored = self.kv_writes is not None
        if stored:
            self.kv_writes.slot_mapping[:n].copy_(meta.slot_mapping)
        q, k, v = self.q[:n], None if stored else self.k[:n], None if stored else self.v[:n]
        attended = self.attended[:n].view(q.shape)
        for i, graph in enumerate(graphs):
            graph.replay()
            if i < d.num_layers:
                d.attend(i, q, k, v, meta, out=attended)
        if stored:  # queued after the replays: the next step's padded rows write scratch again
            self.kv_writes.slot_mapping[:n].fill_(self.scratch_slot)
        return d.logits(self.hidden, logits_rows)
