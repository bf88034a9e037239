"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Sampling is Gumbel-style: argmax(probs / q) with q ~ Exp(1) equals a draw from probs. A seeded
request draws its q from its own generator, one draw per step, so its tokens do not depend on
what else shares the batch.
"""

from __future__ import annotations

import torch

from adapters.staging import to_device_async
from server.engine.sequence import Sequence, TokenLogprob


def device_tensor(values: list, device: torch.device) -> torch.Tensor:
    """A small per-row tensor on the device without waiting for the steps queued before it (a lookahead step's
    sampling would otherwise wait for that step's whole forward)."""
    return to_device_async(torch.tensor(values), device)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [S, V] -> argmax(-1): on CUDA two Triton kernels on the logits' own dtype (server.engine.argmax_kernel;
    no fp32 copy of them: 8 us against 63 on an 8B step)."""
    if logits.is_cuda and logits.stride(-1) == 1:
        from server.engine.argmax_kernel import argmax_rows  # Triton: imported only where CUDA runs it

        return argmax_rows(logits)
    return logits.argmax(-1)


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

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [S, V] -> one token per sequence (+ logprobs where asked), on the host."""
        return self.sample(logits, seqs).to_host()

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> "SampledTokens":
        """logits [S, V] -> the step's tokens on the device, their copy to the host queued (no sync). Everything
        that reads `logits` is queued here, so the next step may overwrite them (a CUDA graph's output)."""
        params = [s.params for s in seqs]
        greedy_tokens = greedy(logits)
        tokens = greedy_tokens
        if not all(p.is_greedy for p in params):
            probs = self._processed_probs(logits.float(), params)
            q = torch.empty_like(probs).exponential_()
            for i, seq in enumerate(seqs):
                if seq.params.seed is not None and not seq.params.is_greedy:
                    q[i].exponential_(generator=self._generator(seq))
            sampled = (probs / q).argmax(-1)
            is_greedy = device_tensor([p.is_greedy for p in params], logits.device)
            tokens = torch.where(is_greedy, greedy_tokens, sampled)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        chosen = top_vals = top_ids = None
        if wanted:
            rows = device_tensor(wanted, logits.device)
            all_logprobs = torch.log_softmax(logits[rows].float(), -1)
            chosen = all_logprobs.gather(1, tokens[rows, None]).squeeze(1)
            max_top = max(params[i].logprobs for i in wanted)
            if max_top:
                top_vals, top_ids = all_logprobs.topk(max_top, -1)
        return SampledTokens(tokens, [(i, params[i].logprobs) for i in wanted], chosen, top_ids, top_vals)

    @staticmethod
    def _processed_probs(logits: torch.Tensor, params) -> torch.Tensor:
        temps = device_tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], logits.device)
        logits = logits / temps[:, None]
        top_ks = [p.top_k for p in params]
        if any(top_ks):
            vocab = logits.shape[-1]
            ks = device_tensor([k if 0 < k < vocab else vocab for k in top_ks], logits.device)
            kth = logits.sort(-1, descending=True).values.gather(1, (ks - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if any(p.top_p < 1 for p in params):
            top_ps = device_tensor([p.top_p for p in params], logits.device)
            sorted_logits, order = logits.sort(-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            drop = sorted_probs.cumsum(-1) - sorted_probs > top_ps[:, None]  # keeps at least the top token
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
        return logits.softmax(-1)


class SampledTokens:
    """One step's sampled tokens [S] on the device (read by the next step's inputs without a sync), with their
    copies to the host (and the logprobs') queued behind the sampling kernels; `to_host` waits for those
    alone, not for work queued after them."""

    def __init__(self, tokens: torch.Tensor, wanted: list[tuple[int, int]], chosen, top_ids, top_vals):
        self.tokens = tokens
        self._wanted = wanted  # (row, top-n) of the rows that asked for logprobs
        to_host = lambda t: t.to("cpu", non_blocking=True) if t is not None else None  # noqa: E731 (pinned: async)
        self._host = [to_host(t) for t in (tokens, chosen, top_ids, top_vals)]
        self._ready = None
        if tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def __len__(self) -> int:
        return len(self.tokens)

    def to_host(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """Step boundary: the one host sync of sampling (waits for this step's copies only)."""
        if self._ready is not None:
            self._ready.synchronize()
        tokens, chosen, top_ids, top_vals = self._host
        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(token_list)
        if self._wanted:
            chosen = chosen.tolist()
            top_ids = top_ids.tolist() if top_ids is not None else None
            top_vals = top_vals.tolist() if top_vals is not None else None
            for row, (i, n) in enumerate(self._wanted):
                top = tuple(zip(top_ids[row][:n], top_vals[row][:n])) if n else ()
                logprobs[i] = TokenLogprob(token_list[i], chosen[row], top)
        return token_list, logprobs
