"""Runs one engine step on the device: the only module that builds device tensors.

It owns the paged KV cache (capacity computed at start from free memory), the adapted model and
its slot stacks, and turns a scheduler output into packed inputs: token ids, positions, per-token
adapter slots and attention metadata.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from adapters.layer import attach_adapters
from adapters.ops import KERNELS_AVAILABLE
from server.config import EngineConfig
from server.engine.attention import (ATTN_IMPLEMENTATION, AttentionMetadata, DecodeMetadata, MixedMetadata,
                                     VarlenMetadata, plan_tiles)
from server.engine.llama_decoder import LlamaDecoder, unsupported_reason
from server.engine.sampler import Sampler
from server.engine.scheduler import ScheduledSeq

log = logging.getLogger(__name__)


def kv_slot(block_table: list[int], position: int, block_size: int) -> int:
    """Flat index in the paged KV cache of a sequence's token at `position`."""
    return block_table[position // block_size] * block_size + position % block_size


def uses_decode_kernels(device: torch.device) -> bool:
    """Whether steps run our Triton kernels (fused decoder, paged and varlen attention): on CUDA. A check may
    patch this to run that path in Triton's interpreter on the CPU."""
    return device.type == "cuda" and KERNELS_AVAILABLE


@dataclass(frozen=True)
class DeviceTokens:
    """A lookahead step's decode inputs, still on the device: for i < len(rows), scheduled[i]'s one token is
    tokens[rows[i]] (the previous step's sampled tokens, which the host has not read yet); the sequences after
    those (admitted prompts) have their tokens on the host."""

    tokens: torch.Tensor  # [num_rows_prev] int64
    rows: list[int]


@dataclass
class DecodeInputs:
    """One decode step's inputs as host arrays (int64), rows past the real sequences padded. With device
    tokens, token_ids holds the device-fed rows' indices into them instead (DeviceTokens.rows)."""

    token_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray  # [rows, max_blocks_per_seq]
    token_slots: list[int]

    @classmethod
    def padding(cls, rows: int, width: int, scratch_block: int, block_size: int) -> "DecodeInputs":
        tables = np.zeros((rows, width), dtype=np.int64)
        tables[:, 0] = scratch_block
        return cls(np.zeros(rows, np.int64), np.zeros(rows, np.int64), np.full(rows, scratch_block * block_size, np.int64),
                   np.ones(rows, np.int64), tables, [-1] * rows)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def kv_cache_spec(model, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return KVCacheSpec(cfg.num_hidden_layers, num_kv_heads, head_dim, block_size, dtype)


class ModelRunner:
    def __init__(self, loaded, basis, cfg: EngineConfig, max_model_len: int):
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.model = loaded.model
        self.block_size = cfg.block_size
        self.max_model_len = max_model_len
        self.adapted = attach_adapters(
            loaded.model, basis, cfg.max_gpu_adapters, cfg.max_rank or basis.rank_max, cfg.max_num_batched_tokens,
            cfg.max_lora_rank, cfg.max_psoft_rank, cfg.adapter_pool_ranks,
        )
        self.decode_kernels = uses_decode_kernels(self.device)
        if self.device.type == "cuda":
            # process-wide: cuBLASLt picks a faster kernel for the decode step's down_proj (M = 64, K = 14336:
            # 31.4 against 36.6 us a layer on the H200) and the same for the other GEMMs (step-kernels-h200.json)
            torch.backends.cuda.preferred_blas_library("cublaslt")
        if self.decode_kernels:
            from server.engine.rms_norm import fuse_rms_norms

            log.info("fused RMSNorm: %d modules swapped", fuse_rms_norms(self.model))
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        reason = unsupported_reason(self.model)
        self.decoder = LlamaDecoder(self.model, fused_kernels=self.decode_kernels) if reason is None else None
        log.info("forward: %s", "our Llama-family decoder" if reason is None else f"transformers' ({reason})")
        self.spec = kv_cache_spec(self.model, cfg.block_size, self.dtype)
        self.max_blocks_per_seq = math.ceil(max_model_len / cfg.block_size)
        self.num_kv_blocks = self._kv_capacity(cfg)
        self.scratch_block = self.num_kv_blocks  # one extra block that padded decode rows write into
        num_kv_slots = (self.num_kv_blocks + 1) * cfg.block_size
        self.kv_caches = [
            torch.zeros(2, num_kv_slots, self.spec.num_kv_heads, self.spec.head_dim, dtype=self.dtype, device=self.device)
            for _ in range(self.spec.num_layers)
        ]
        self.sampler = Sampler(self.device)
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", self.num_kv_blocks, cfg.block_size,
                 self.num_kv_blocks * self.spec.bytes_per_block / 2**30)
        self.graphs = None
        if self.decode_kernels and cfg.cuda_graphs:
            from server.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, cfg.max_num_seqs)
            self.graphs.capture()
        self.prefill_graphs = None
        if self.graphs is not None and self.decoder is not None:
            from server.engine.piecewise_graphs import PrefillGraphs

            self.prefill_graphs = PrefillGraphs(self, self.decoder, cfg.max_num_batched_tokens)
            self.prefill_graphs.capture()

    def _kv_capacity(self, cfg: EngineConfig) -> int:
        """Blocks to allocate: the override; else what fits (GPU memory left after weights and a reserve
        for one step's activations, or the CPU budget), capped at what max_num_seqs sequences of
        max_model_len tokens can ever use at once."""
        blocks_per_seq = self.max_blocks_per_seq
        if cfg.num_kv_blocks is not None:
            fit = cfg.num_kv_blocks
        elif self.device.type != "cuda":
            fit = int(cfg.cpu_kv_cache_gib * 2**30 // self.spec.bytes_per_block)
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)  # cached, unused
            spec = self.spec
            gather = 2 * cfg.max_num_seqs * self.max_model_len * spec.num_kv_heads * spec.head_dim * spec.dtype.itemsize
            hidden = self.model.config.get_text_config().hidden_size
            activations = 16 * cfg.max_num_batched_tokens * hidden * spec.dtype.itemsize + 4 * gather
            fit = int((total * cfg.gpu_memory_utilization - (total - free) - activations) // spec.bytes_per_block)
        num_blocks = fit if cfg.num_kv_blocks is not None else min(fit, cfg.max_num_seqs * blocks_per_seq)
        if num_blocks < blocks_per_seq:  # a full-length request would preempt itself forever
            raise RuntimeError(
                f"KV cache fits {num_blocks} blocks, fewer than one {self.max_model_len}-token sequence needs "
                f"({blocks_per_seq}); lower max_model_len, or give the server more memory (or more --num-kv-blocks)"
            )
        return num_blocks

    def load_adapter(self, slot: int, tensors: dict, pages: list[int] | None = None) -> float:
        """Copy an adapter's slot tensors (group -> M) into a slot and its rank pages (SlotTable.pages_of; None:
        the slot's own run, SlotStacks.own_pages); returns the seconds the copy took."""
        start = time.perf_counter()
        self.adapted.slot_stacks.write(slot, tensors, pages, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # adapter activation is rare; time it honestly
        return time.perf_counter() - start

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, meta, logits_rows: torch.Tensor) -> torch.Tensor:
        """The model's forward on one packed row of tokens -> logits [1, len(logits_rows), V]: ours for the Llama
        family, else transformers' own."""
        if self.decoder is not None:
            return self.decoder.forward(token_ids, positions, meta, logits_rows)
        out = self.model(input_ids=token_ids[None], position_ids=positions[None], pica_attention=meta,
                         logits_to_keep=logits_rows, use_cache=False)
        return out.logits

    def decode_inputs(self, scheduled: list[ScheduledSeq], pad_to: int, device_tokens: DeviceTokens | None = None
                      ) -> "DecodeInputs":
        """Host arrays for a decode-only step, padded with dummy rows (scratch KV block, no adapter)."""
        bs = self.block_size
        inputs = DecodeInputs.padding(pad_to, self.max_blocks_per_seq, self.scratch_block, bs)
        for i, item in enumerate(scheduled):
            seq, pos = item.seq, item.start
            fed = device_tokens is not None and i < len(device_tokens.rows)
            inputs.token_ids[i] = device_tokens.rows[i] if fed else seq.token_ids[pos]
            inputs.positions[i] = pos
            inputs.slot_mapping[i] = kv_slot(seq.block_table, pos, bs)
            inputs.context_lens[i] = pos + 1
            inputs.block_tables[i, : len(seq.block_table)] = seq.block_table
            inputs.block_tables[i, len(seq.block_table) :] = 0
            inputs.token_slots[i] = seq.slot
        return inputs

    def _run_decode_eager(self, scheduled: list[ScheduledSeq], device_tokens: DeviceTokens | None) -> torch.Tensor:
        inputs = self.decode_inputs(scheduled, len(scheduled), device_tokens)
        # pageable sources: the driver has read each array when the call returns, so fresh arrays need no staging
        to_dev = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)  # noqa: E731
        meta = DecodeMetadata(self.kv_caches, to_dev(inputs.slot_mapping), to_dev(inputs.block_tables),
                              to_dev(inputs.context_lens), self.block_size)
        self.adapted.slot_index.set(inputs.token_slots)
        rows = torch.arange(len(scheduled), device=self.device)
        token_ids = to_dev(inputs.token_ids)
        if device_tokens is not None:
            fed = token_ids[: len(device_tokens.rows)]
            fed.copy_(device_tokens.tokens.index_select(0, fed))
        return self.forward(token_ids, to_dev(inputs.positions), meta, rows)[0]

    def timing_event(self) -> "torch.cuda.Event | None":
        """A timing event recorded on the current stream now (step boundaries for the stats); None off CUDA."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @torch.no_grad()
    def run(self, scheduled: list[ScheduledSeq], device_tokens: DeviceTokens | None = None) -> torch.Tensor:
        """Forward the step's tokens; returns logits [num_sampling_seqs, V] in scheduled order. With
        device_tokens (a lookahead step) the leading decodes' input tokens are read on the device."""
        if self.decode_kernels and all(item.num_tokens == 1 and item.samples for item in scheduled):
            if self.graphs is not None and self.graphs.bucket_for(len(scheduled)) is not None:
                return self.graphs.run(scheduled, device_tokens)
            return self._run_decode_eager(scheduled, device_tokens)
        num_fed = 0 if device_tokens is None else len(device_tokens.rows)
        if any(item.num_tokens != 1 for item in scheduled[:num_fed]):
            raise ValueError("device tokens feed decodes only")
        bs = self.block_size
        token_ids, positions, token_slots, slot_mapping, logits_rows = [], [], [], [], []
        for i, item in enumerate(scheduled):
            seq, start, n = item.seq, item.start, item.num_tokens
            token_ids += [0] if i < num_fed else seq.token_ids[start : start + n]  # fed ones: filled below
            positions += range(start, start + n)
            token_slots += [seq.slot] * n
            slot_mapping += [kv_slot(seq.block_table, p, bs) for p in range(start, start + n)]
            if item.samples:
                logits_rows.append(len(token_ids) - 1)
        as_long = self._to_device
        meta = self._attention_metadata(scheduled, as_long(slot_mapping), as_long, device_tokens)
        bucket = None if self.prefill_graphs is None else self.prefill_graphs.bucket_for(len(token_ids))
        # a captured bucket's padded rows carry no adapter
        with_prompts = len(token_ids) > len(scheduled) or any(not item.samples for item in scheduled)
        self.adapted.slot_index.set(token_slots + [-1] * ((bucket or 0) - len(token_ids)), with_prompts=with_prompts)
        ids = as_long(token_ids)
        if num_fed:  # one token each, first: they are packed rows 0..num_fed-1
            ids[:num_fed] = device_tokens.tokens.index_select(0, as_long(device_tokens.rows))
        graphs = None if bucket is None else self.prefill_graphs.graphs_for(bucket)
        if graphs is not None:
            return self.prefill_graphs.run(ids, as_long(positions), meta, as_long(logits_rows), graphs)[0]
        if bucket is not None:  # not captured for this kind: the index must cover the real tokens only
            self.adapted.slot_index.set(token_slots, with_prompts=with_prompts)
        return self.forward(ids, as_long(positions), meta, as_long(logits_rows))[0]

    def _to_device(self, values) -> torch.Tensor:
        """Host values (a list: as longs; a numpy array: as they are) as a tensor on the device; on CUDA through
        pinned memory, without a stream sync: a lookahead step's inputs are built while the step before runs (a
        pageable copy waits for it, 9 times a step with prompts). torch's caching host allocator keeps the pinned
        block until its copy is done."""
        host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _attention_metadata(self, scheduled: list[ScheduledSeq], slot_mapping: torch.Tensor, as_long,
                            device_tokens: DeviceTokens | None = None) -> AttentionMetadata | MixedMetadata | VarlenMetadata:
        """Attention over the step's packed tokens (scheduled order). On CUDA, one varlen kernel over the paged
        cache. Elsewhere padded SDPA; where decodes run beside prompt chunks, each part attends on its own (decodes
        padded to one query), so their queries are not padded to the longest chunk."""
        starts = np.cumsum([0] + [item.num_tokens for item in scheduled[:-1]]).tolist()
        if self.decode_kernels:
            tiles = plan_tiles(starts, [item.num_tokens for item in scheduled], [item.start for item in scheduled])
            # its block tables: one row a sequence (a fed decode's token is not on the host yet)
            inputs = self.decode_inputs(scheduled, len(scheduled), device_tokens)
            return VarlenMetadata(self.kv_caches, slot_mapping, self._to_device(tiles), tiles.shape[1],
                                  self._to_device(inputs.block_tables), self.block_size)
        # one query a sequence, whether a decode or a prompt's one-token chunk: the decode kernel's case
        decodes = [i for i, item in enumerate(scheduled) if item.num_tokens == 1]
        if not decodes or len(decodes) == len(scheduled):
            return self._padded_metadata(scheduled, slot_mapping, as_long)
        prefills = [i for i in range(len(scheduled)) if scheduled[i].num_tokens != 1]
        decode_rows = [starts[i] for i in decodes]
        prefill_rows = [starts[i] + j for i in prefills for j in range(scheduled[i].num_tokens)]
        prefill_meta = self._padded_metadata([scheduled[i] for i in prefills], slot_mapping, as_long)
        decode_part = [scheduled[i] for i in decodes]
        decode_meta = self._padded_metadata(decode_part, slot_mapping, as_long)
        return MixedMetadata(self.kv_caches, slot_mapping, as_long(decode_rows), decode_meta, as_long(prefill_rows),
                             prefill_meta)

    def _padded_metadata(self, scheduled: list[ScheduledSeq], slot_mapping: torch.Tensor, as_long) -> AttentionMetadata:
        """Each sequence's queries padded to the longest; the tokens it covers: the scheduled ones, packed in order."""
        bs, dev = self.block_size, self.device
        query_lens = [item.num_tokens for item in scheduled]
        query_starts = np.cumsum([0] + query_lens[:-1]).tolist()
        context_lens = [item.start + item.num_tokens for item in scheduled]
        block_tables = [item.seq.block_table for item in scheduled]
        num_seqs, max_q, max_k = len(scheduled), max(query_lens), max(context_lens)
        max_blocks = max(len(t) for t in block_tables)
        tables = as_long([t + [0] * (max_blocks - len(t)) for t in block_tables])  # [S, max_blocks]
        q_start, q_len, ctx = as_long(query_starts), as_long(query_lens), as_long(context_lens)
        kpos = torch.arange(max_k, device=dev)
        kv_index = tables.gather(1, (kpos // bs).expand(num_seqs, -1)) * bs + kpos % bs  # [S, Kmax]
        qi = torch.arange(max_q, device=dev)[None, :]
        query_index = q_start[:, None] + torch.minimum(qi, q_len[:, None] - 1)  # [S, Qmax]
        query_positions = torch.where(qi < q_len[:, None], ctx[:, None] - q_len[:, None] + qi, -1)
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=dev), q_len, output_size=sum(query_lens))
        token_gather = seq_of_token * max_q + torch.arange(sum(query_lens), device=dev) - q_start[seq_of_token]
        return AttentionMetadata(self.kv_caches, slot_mapping, query_index, kv_index, query_positions, ctx,
                                 token_gather)
