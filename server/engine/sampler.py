"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Sampling is Gumbel-style: argmax(probs / q) with q ~ Exp(1) equals a draw from probs. A seeded
request draws its q from its own generator, one draw per step, so its tokens do not depend on
what else shares the batch.
"""

from __future__ import annotations

import torch

from server.engine.sequence import Sequence, TokenLogprob


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def add(self, seq: Sequence) -> None:
        """Seed a request's generator when it arrives, so a seed torch refuses fails that request alone
        (ValueError) instead of a step that serves others."""
        if seq.params.seed is None:
            return
        try:
            self._generators[seq.request_id] = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        except (RuntimeError, OverflowError, ValueError) as exc:
            raise ValueError(f"seed {seq.params.seed} cannot seed a generator: {exc}") from exc

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator:
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            self._generators[seq.request_id] = gen
        return gen

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [S, V] -> one token per sequence (+ logprobs where asked)."""
        logits = logits.float()
        params = [s.params for s in seqs]
        greedy_tokens = logits.argmax(-1)
        tokens = greedy_tokens
        if not all(p.is_greedy for p in params):
            probs = self._processed_probs(logits, params)
            q = torch.empty_like(probs).exponential_()
            for i, seq in enumerate(seqs):
                if seq.params.seed is not None and not seq.params.is_greedy:
                    q[i].exponential_(generator=self._generator(seq))
            sampled = (probs / q).argmax(-1)
            is_greedy = torch.tensor([p.is_greedy for p in params], device=logits.device)
            tokens = torch.where(is_greedy, greedy_tokens, sampled)
        token_list = tokens.tolist()  # step boundary: the one host sync of sampling
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            all_logprobs = torch.log_softmax(logits[wanted], -1)
            chosen = all_logprobs.gather(1, tokens[wanted, None]).squeeze(1).tolist()
            max_top = max(params[i].logprobs for i in wanted)
            top_vals, top_ids = all_logprobs.topk(max_top, -1) if max_top else (None, None)
            for row, i in enumerate(wanted):
                n = params[i].logprobs
                top = tuple(zip(top_ids[row, :n].tolist(), top_vals[row, :n].tolist())) if n else ()
                logprobs[i] = TokenLogprob(token_list[i], chosen[row], top)
        return token_list, logprobs

    @staticmethod
    def _processed_probs(logits: torch.Tensor, params) -> torch.Tensor:
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
        logits = logits / temps[:, None]
        top_ks = [p.top_k for p in params]
        if any(top_ks):
            vocab = logits.shape[-1]
            ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device)
            kth = logits.sort(-1, descending=True).values.gather(1, (ks - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if any(p.top_p < 1 for p in params):
            top_ps = torch.tensor([p.top_p for p in params], device=logits.device)
            sorted_logits, order = logits.sort(-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            drop = sorted_probs.cumsum(-1) - sorted_probs > top_ps[:, None]  # keeps at least the top token
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
        return logits.softmax(-1)
