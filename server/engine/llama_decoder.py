"""Our own forward for the Llama family (Llama, Mistral, Qwen2): the model's own modules and weights, run as a
flat loop of layers cut at the attention calls.

transformers' forward nests the attention call inside each layer's module, so nothing between two attention
calls can be captured on its own. Here a step is `embed -> (attention_inputs -> attend -> after_attention) per
layer -> final_norm -> logits`; everything but `attend` has static shapes and no host decisions, so steps with
prompts replay CUDA graphs of those pieces per token count (server.engine.piecewise_graphs) and run only the
attention, whose shapes change every step, eagerly. The target linears are whatever the model holds (the
adapted ones share one GEMM for q/k/v and one for gate/up). With `fused_kernels` (CUDA) the elementwise work
between the GEMMs runs as one Triton kernel each: RoPE on q and k, each residual add with the norm after it, and
SiLU(gate) * up (server.engine.fused_pointwise, rms_norm.add_rms_norm); a whole-step forward also writes
the KV cache in the RoPE kernel. A layer hands the next its MLP output still to be added (`pending`): the add
joins the next layer's input norm (or the final norm), one kernel where it was two. Any other architecture keeps
transformers' forward (ModelRunner.forward); both are tested against the dense merged model.
"""

from __future__ import annotations

import torch
from torch import nn

from server.engine.attention import paged_attention

ARCHITECTURES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
"""Rotary embeddings whose tables depend on the positions only: `dynamic` and `longrope` resize them on the host
from the longest position seen, which a captured graph would not repeat."""


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this model keeps transformers' own forward, or None where this decoder runs it."""
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        return f"architecture {cfg.model_type!r} (this decoder runs {', '.join(ARCHITECTURES)})"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope not in ROPE_TYPES:
        return f"rope type {rope!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    return None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D]: transformers' rotate-half RoPE (`x cos + rotate_half(x) sin`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class LlamaDecoder:
    """The step forward of a Llama-family causal LM on one packed row of tokens (ModelRunner.forward's contract)."""

    def __init__(self, model: nn.Module, fused_kernels: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LlamaDecoder does not run this model: {reason}")
        inner, cfg = model.model, model.config
        self.embed_tokens, self.rotary, self.norm, self.lm_head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = list(inner.layers[: cfg.num_hidden_layers])
        self.num_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        mistral_window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        self.sliding_windows = [getattr(layer.self_attn, "sliding_window", mistral_window) for layer in self.layers]
        self.rope, self.silu_mul, self.add_rms_norm, self.rope_store = rotate, None, None, None
        self.fused_norms: dict[int, nn.Module] = {}
        """id of a norm module -> the RMSNorm it wraps, for the norms a residual add joins in one kernel."""
        if fused_kernels:  # Triton: imported only where CUDA runs it
            from server.engine import fused_pointwise
            from server.engine.rms_norm import FusedRMSNorm, add_rms_norm

            self.rope, self.silu_mul, self.add_rms_norm = fused_pointwise.rope, fused_pointwise.silu_mul, add_rms_norm
            self.rope_store = fused_pointwise.rope_store
            # the residual add joins a norm only where its formula was checked against the kernel's (fuse_rms_norms)
            norms = [self.norm] + [n for layer in self.layers for n in (layer.input_layernorm,
                                                                        layer.post_attention_layernorm)]
            self.fused_norms = {id(n): n.norm for n in norms if isinstance(n, FusedRMSNorm)}

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T] ids and positions -> hidden [T, hidden], cos and sin [T, D] (shared by every layer)."""
        hidden = self.embed_tokens(token_ids)
        cos, sin = self.rotary(hidden[None], positions[None])
        return hidden, cos[0], sin[0]

    def add_norm(self, norm: nn.Module, hidden: torch.Tensor, pending: torch.Tensor | None):
        """(hidden + pending, norm of it): one kernel where the norm is fused (pending None: nothing to add)."""
        if pending is None:
            return hidden, norm(hidden)
        fused = self.fused_norms.get(id(norm))
        if fused is not None:
            return self.add_rms_norm(hidden, pending, fused.weight, fused.variance_epsilon)
        hidden = hidden + pending
        return hidden, norm(hidden)

    def projections(self, i: int, hidden: torch.Tensor, pending: torch.Tensor | None = None):
        """Layer i's residual stream (pending added) and its q [T, H, D], k and v [T, Hkv, D] before RoPE."""
        attn = self.layers[i].self_attn
        hidden, x = self.add_norm(self.layers[i].input_layernorm, hidden, pending)
        q = attn.q_proj(x).view(-1, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        return hidden, q, k, v

    def attention_inputs(self, i: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         pending: torch.Tensor | None = None):
        """Layer i's residual stream (pending added), q [T, H, D], k and v [T, Hkv, D] (RoPE applied)."""
        hidden, q, k, v = self.projections(i, hidden, pending)
        return hidden, self.rope(q, cos, sin), self.rope(k, cos, sin), v

    def stored_attention_inputs(self, i: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                meta, pending: torch.Tensor | None = None):
        """Layer i's residual stream (pending added) and q (RoPE applied), its k and v already written into the
        layer's paged cache (one kernel)."""
        hidden, q, k, v = self.projections(i, hidden, pending)
        kv = meta.kv_caches[i]
        return hidden, self.rope_store(q, k, v, cos, sin, kv[0], kv[1], meta.slot_mapping)

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, meta,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Layer i's paged attention -> [T, H * D] (k, v None: already in the cache; out: [T, H, D] to write)."""
        attn = self.layers[i].self_attn
        out = paged_attention(i, q, k, v, meta, attn.scaling, self.sliding_windows[i], out=out)
        return out.reshape(out.shape[0], -1)

    def after_attention(self, i: int, hidden: torch.Tensor, attended: torch.Tensor):
        """Layer i after its attention: o_proj, residual add, norm, gated MLP -> (the residual stream, the MLP's
        output still to be added: the next add_norm adds it)."""
        layer = self.layers[i]
        hidden, x = self.add_norm(layer.post_attention_layernorm, hidden, layer.self_attn.o_proj(attended))
        mlp = layer.mlp
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        act = self.silu_mul(gate, up) if self.silu_mul is not None else mlp.act_fn(gate) * up
        return hidden, mlp.down_proj(act)

    def final_norm(self, hidden: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """The last layer's residual stream, pending added, through the model's final norm."""
        return self.add_norm(self.norm, hidden, pending)[1]

    def logits(self, normed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The final-normed rows that sample -> logits [1, len(rows), V] (as transformers' logits_to_keep)."""
        return self.lm_head(normed[rows])[None]

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, meta, logits_rows: torch.Tensor) -> torch.Tensor:
        hidden, cos, sin = self.embed(token_ids, positions)
        pending = None
        for i in range(self.num_layers):
            if self.rope_store is not None:
                (hidden, q), k, v = self.stored_attention_inputs(i, hidden, cos, sin, meta, pending), None, None
            else:
                hidden, q, k, v = self.attention_inputs(i, hidden, cos, sin, pending)
            hidden, pending = self.after_attention(i, hidden, self.attend(i, q, k, v, meta))
        return self.logits(self.final_norm(hidden, pending), logits_rows)
