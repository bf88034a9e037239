"""Paged attention over the engine's KV cache, plugged into transformers' attention interface.

The engine runs the model's own forward (so every transformers architecture whose attention goes
through `ALL_ATTENTION_FUNCTIONS` works) on one packed row of tokens from many sequences, each at
its own position. This function writes the step's K/V into the paged cache and attends each query
to its own sequence's cached keys. Registering it with no mask function makes transformers skip
building masks: the metadata carries everything.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "pica_paged"
VARIED_SHAPE_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""SDPA backends for prefill and mixed steps on CUDA, whose shapes change every step: cuDNN's (torch's first
choice on Hopper) builds an execution plan per new shape, about 2 ms of host time per call and layer (1.27 s in
the first wave after start on the H200, bench/results/prefill-steps-h200-cudnn.profile.txt)."""


VARLEN_BLOCK_M = 16
"""Query tokens per tile of the varlen kernel (server.engine.varlen_attention)."""


def plan_tiles(query_starts: list[int], query_lens: list[int], positions: list[int]) -> np.ndarray:
    """int32 [4, num_tiles]: each tile's sequence, first token row, token count and first query position, for
    sequences whose query_lens[s] tokens start at step row query_starts[s] and position positions[s]."""
    lens = np.asarray(query_lens, dtype=np.int64)
    per_seq = -(-lens // VARLEN_BLOCK_M)
    seq = np.repeat(np.arange(len(lens)), per_seq)
    first = np.cumsum(per_seq) - per_seq
    offset = (np.arange(len(seq)) - first[seq]) * VARLEN_BLOCK_M
    tiles = np.stack([seq, np.asarray(query_starts, np.int64)[seq] + offset,
                      np.minimum(lens[seq] - offset, VARLEN_BLOCK_M), np.asarray(positions, np.int64)[seq] + offset])
    return tiles.astype(np.int32)


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner; shapes: T step tokens, S sequences."""

    kv_caches: list[torch.Tensor]
    """Per layer [2, num_blocks * block_size, Hkv, D]."""
    slot_mapping: torch.Tensor
    """[T] flat KV index where each step token's K/V is written."""
    query_index: torch.Tensor
    """[S, Qmax] step-token index of each sequence's queries (padding repeats a valid one)."""
    kv_index: torch.Tensor
    """[S, Kmax] flat KV index of each sequence's context positions (padding points at 0)."""
    query_positions: torch.Tensor
    """[S, Qmax] absolute positions of the queries (-1 for padding)."""
    context_lens: torch.Tensor
    """[S] tokens in each sequence's cache after this step's writes."""
    token_gather: torch.Tensor
    """[T] index into the flattened [S * Qmax] outputs giving each step token's output."""
    _masks: dict = field(default_factory=dict)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[S, 1, Qmax, Kmax] bool: causal within the sequence, inside its context (and window).
        Built once per step (and window size), not once per layer."""
        if sliding_window not in self._masks:
            self._masks[sliding_window] = self._build_mask(sliding_window)
        return self._masks[sliding_window]

    def _build_mask(self, sliding_window: int | None) -> torch.Tensor:
        kpos = torch.arange(self.kv_index.shape[1], device=self.kv_index.device)
        qpos = self.query_positions[:, :, None]
        allowed = (kpos[None, None, :] <= qpos) & (kpos[None, None, :] < self.context_lens[:, None, None])
        if sliding_window is not None:
            allowed &= qpos - kpos[None, None, :] < sliding_window
        allowed |= (qpos < 0) & (kpos[None, None, :] == 0)  # padding queries see one key: no NaN rows
        return allowed[:, None]


@dataclass
class DecodeMetadata:
    """A decode-only step on CUDA: one query per sequence; static shapes, so CUDA graphs capture it."""

    kv_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor
    """[S] flat KV index of each sequence's new token."""
    block_tables: torch.Tensor
    """[S, max_blocks] integer block ids."""
    context_lens: torch.Tensor
    """[S] integer, including the new token."""
    block_size: int


@dataclass
class VarlenMetadata:
    """A step with prompts on CUDA: every sequence's queries in tiles (server.engine.varlen_attention.plan_tiles)
    attending the paged cache in one kernel launch per layer."""

    kv_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor
    """[T] flat KV index where each step token's K/V is written."""
    tiles: torch.Tensor
    """int32 [4, num_tiles]: sequence, first token row, token count, first query position."""
    num_tiles: int
    block_tables: torch.Tensor
    """[S, max_blocks] integer block ids."""
    block_size: int


@dataclass
class MixedMetadata:
    """A step of decodes and prompt chunks: each part attends on its own, so the decodes' queries are not
    padded to the longest chunk (a [S, H, Qmax, Kmax] attention for one query a sequence) and, on CUDA, run
    the paged decode kernel. Rows index the step's T tokens."""

    kv_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor
    """[T] flat KV index where each step token's K/V is written (the parts' own slot_mapping is not read)."""
    decode_rows: torch.Tensor
    decode: AttentionMetadata | DecodeMetadata
    prefill_rows: torch.Tensor
    prefill: AttentionMetadata


def paged_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None,
    pica_attention: AttentionMetadata | DecodeMetadata | MixedMetadata | None = None, **kwargs,
):
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    out = paged_attention(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                          value[0].transpose(0, 1), pica_attention, scaling, sliding_window, softcap)
    return out[None], None


def paged_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    meta: AttentionMetadata | DecodeMetadata | MixedMetadata | VarlenMetadata, scaling=None, sliding_window=None,
                    softcap=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] of the step's tokens: writes k/v into layer's paged cache (k, v None: the
    caller wrote them, fused_pointwise.rope_store), then attends each query to its own sequence's cached keys
    -> [T, H, D] (into `out` where given: the varlen kernel writes it in place, saving a launch)."""
    kv = meta.kv_caches[layer]
    if k is not None:
        kv[0].index_copy_(0, meta.slot_mapping, k.to(kv.dtype))
        kv[1].index_copy_(0, meta.slot_mapping, v.to(kv.dtype))
    if isinstance(meta, VarlenMetadata):
        from server.engine.varlen_attention import paged_varlen_attention  # Triton: CUDA machines only

        return paged_varlen_attention(q, kv[0], kv[1], meta.tiles, meta.num_tiles, meta.block_tables,
                                      meta.block_size, scaling, sliding_window, softcap, out)
    attend = lambda part, q_part: _attend(part, q_part, kv, scaling, sliding_window, softcap)  # noqa: E731
    if isinstance(meta, MixedMetadata):
        result = torch.empty_like(q)
        result[meta.decode_rows] = attend(meta.decode, q[meta.decode_rows])
        result[meta.prefill_rows] = attend(meta.prefill, q[meta.prefill_rows])
    else:
        result = attend(meta, q)
    return result if out is None else out.copy_(result)


def _attend(meta: AttentionMetadata | DecodeMetadata, q: torch.Tensor, kv: torch.Tensor, scaling, sliding_window,
            softcap) -> torch.Tensor:
    """q [T, H, D] of the tokens `meta` describes, their K/V already in the cache -> [T, H, D]."""
    if isinstance(meta, DecodeMetadata):
        from server.engine.decode_attention import paged_decode_attention  # Triton: CUDA machines only

        return paged_decode_attention(q, kv[0], kv[1], meta.block_tables, meta.context_lens, meta.block_size,
                                      scaling, sliding_window, softcap)
    q = q[meta.query_index].transpose(1, 2)  # [S, H, Qmax, D]
    k = kv[0][meta.kv_index].transpose(1, 2)  # [S, Hkv, Kmax, D]
    v = kv[1][meta.kv_index].transpose(1, 2)
    mask = meta.mask(sliding_window)
    if softcap is None:
        out = grouped_sdpa(q, k, v, mask, scaling)
    else:
        out = attention_reference(q, k, v, mask, scaling, softcap)
    num_seqs, num_heads, max_q, head_dim = out.shape
    return out.transpose(1, 2).reshape(num_seqs * max_q, num_heads, head_dim)[meta.token_gather]  # [T, H, D]


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling) -> torch.Tensor:
    """q [S, H, Qmax, D], k/v [S, Hkv, Kmax, D], mask [S, 1, Qmax, Kmax] -> [S, H, Qmax, D]. The H / Hkv query
    heads that share a K/V head attend as that many times Qmax queries of one head, so K/V are read as gathered:
    the memory-efficient kernel takes no grouped heads, and repeating K/V would multiply the largest tensor here
    (every context position of every sequence) instead of the queries' mask. On CUDA, VARIED_SHAPE_BACKENDS."""
    num_seqs, num_heads, max_q, head_dim = q.shape
    num_kv_heads, max_k = k.shape[1], k.shape[2]
    rep = num_heads // num_kv_heads
    if rep > 1:  # head h = g * rep + j: query row j * Qmax + i of K/V head g
        q = q.reshape(num_seqs, num_kv_heads, rep * max_q, head_dim)
        mask = mask[:, :, None].expand(num_seqs, 1, rep, max_q, max_k).reshape(num_seqs, 1, rep * max_q, max_k)
    with sdpa_kernel(VARIED_SHAPE_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.reshape(num_seqs, num_heads, max_q, head_dim)


def attention_reference(q, k, v, mask, scaling, softcap=None):
    """Semantics: softmax(mask(softcap(q k^T * scaling))) v per sequence, with GQA head sharing."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)).float() * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype)) @ v


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
