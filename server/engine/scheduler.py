"""Decides, each step, which sequences run and how many tokens each computes (pure Python).

Running sequences go first, oldest first: a decoding sequence computes one token, a prefilling one
a chunk of its prompt, all under one token budget. Waiting sequences are then admitted in arrival
order while budget, sequence count, KV blocks and a GPU slot for their adapter allow. Where the step
decodes, its prompt tokens (chunks and admissions) may be held to a smaller budget as well
(`max_prefill_tokens_with_decodes`, 192 by default): a long prompt then no longer holds every stream's
next token for its whole prefill, but is spread over several steps (Sarathi-Serve's stall-free batching). When KV
blocks run out, the youngest running sequence is preempted (its blocks freed, recomputed later).

Fairness: arrival order is kept. When the oldest waiting request cannot get an adapter slot (all
pinned by running requests), only requests for the base model, which need no slot, may pass it;
requests for other adapters wait behind it, so it cannot starve.

Lookahead (`schedule_lookahead`): while step N runs, step N+1 is scheduled as `schedule()` would schedule it
once N's tokens are known, and only where that is certain; otherwise the engine waits for N and calls
`schedule()`. That covers new requests too: a prompt admitted beside the decodes is known on the host, so the
step that first computes it need not wait for the one before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cache.slot_table import BASE_SLOT, SlotTable
from server.engine.block_manager import BlockManager
from server.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    start: int
    """Position of the first token computed this step."""
    num_tokens: int
    samples: bool
    """True when this chunk reaches the end of the sequence, so its last logits give the next token."""


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    slot_loads: list[tuple[int, object]] = field(default_factory=list)
    """(slot, AdapterHandle) to copy into the slot stacks before this step's forward."""
    num_preempted: int = 0


def _decodes(seq: Sequence) -> bool:
    """Whether the sequence's next step computes its newest output token (all else it computes is prompt)."""
    return seq.num_uncomputed_tokens == 1 and seq.num_output_tokens > 0


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, blocks: BlockManager, slots: SlotTable,
                 max_prefill_tokens_with_decodes: int | None = None, pages_for: Callable[[object], int] | None = None):
        """pages_for(adapter handle): the rank pages its slot takes (SlotStacks.pages_for; None: pages untracked)."""
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens_with_decodes = max_prefill_tokens_with_decodes or max_num_batched_tokens
        self.blocks = blocks
        self.slots = slots
        self.pages_for = pages_for or (lambda handle: 0)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decoding = any(_decodes(seq) for seq in self.running)
        prefill_budget = self.max_prefill_tokens_with_decodes if decoding else budget
        kept: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            prefills = not _decodes(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget, prefill_budget if prefills else budget)
            if num_tokens == 0:
                kept.append(seq)
                continue
            while not self.blocks.can_allocate(seq, num_tokens):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.blocks.allocate(seq, num_tokens)
            out.scheduled.append(self._chunk(seq, num_tokens))
            budget -= num_tokens
            if prefills:
                prefill_budget -= num_tokens
            kept.append(seq)
        self.running = kept
        if out.num_preempted == 0:
            self._admit_waiting(out, min(budget, prefill_budget))
        return out

    def schedule_lookahead(self, has_pending_token: Callable[[Sequence], bool], will_finish: Callable[[Sequence], bool],
                           may_finish: Callable[[Sequence], bool]) -> SchedulerOutput | None:
        """Step N+1 while step N runs: one decode for each running sequence with a token pending in N but those
        that `will_finish` at N (their N+1 token could only be wasted), the next chunk of each running prompt N
        did not finish, then the waiting requests schedule() would admit after N; or None where schedule() after
        N might do otherwise.

        A running sequence without a token pending in N (`has_pending_token`) must be a prompt part-way through
        (a chunk of it that did not reach the end): its next tokens are on the host. The decodes must fit the token
        budget and the free KV blocks as they are now (N's finishes only free more, so schedule() would not
        preempt). The decodes come first in the output: their input tokens are N's samples."""
        pending = [seq for seq in self.running if has_pending_token(seq)]
        prompts = [seq for seq in self.running if not has_pending_token(seq)]
        if any(_decodes(seq) for seq in prompts):  # a decode N left out (the budget): schedule() decides
            return None
        decodes = [seq for seq in pending if not will_finish(seq)]
        if not decodes or len(decodes) > self.max_num_batched_tokens:
            return None
        decode_blocks = sum(self.blocks.num_blocks_needed(seq, 1) for seq in decodes)
        if decode_blocks > self.blocks.num_free_blocks:
            return None
        certain = self._certain_prompts(decodes, prompts, self.blocks.num_free_blocks - decode_blocks, may_finish)
        if certain is None:
            return None
        chunks, admissions = certain
        out = SchedulerOutput()
        for seq in decodes:
            self.blocks.allocate(seq, 1)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, 1, samples=True))
        for seq, num_tokens in chunks:
            self.blocks.allocate(seq, num_tokens)
            out.scheduled.append(self._chunk(seq, num_tokens))
        for seq, num_tokens in admissions:
            self._admit(out, seq, num_tokens, pages=0)
        return out

    def _certain_prompts(self, decodes: list[Sequence], prompts: list[Sequence], free_blocks: int,
                         may_finish: Callable[[Sequence], bool]):
        """(chunks of the running `prompts`, admissions): (sequence, prompt tokens) pairs that schedule() after step
        N would schedule beside `decodes`, N's survivors, whatever N samples; None where that is not certain, or
        where an admission would load an adapter slot (a load waits for the device).

        N's finishes can only add sequence places, KV blocks, slots and token budget, and end the decodes that
        hold prompts to the smaller budget. So what is scheduled now is what schedule() would schedule where no
        running sequence may finish at N, or where admission stopped for want of neither a place nor blocks and no
        chunk was cut by a budget that N's finishes could raise. A running prompt's chunk cut by the whole step's
        budget (not the one for prompts beside decodes) depends on where it stands among the decodes: None."""
        changeable = any(may_finish(seq) for seq in self.running)
        budget = self.max_num_batched_tokens - len(decodes)
        prompt_limit_binds = self.max_prefill_tokens_with_decodes <= budget
        limit = min(budget, self.max_prefill_tokens_with_decodes)
        limit_fixed = not changeable or (prompt_limit_binds and not all(may_finish(seq) for seq in decodes))
        chunks: list[tuple[Sequence, int]] = []
        for seq in prompts:  # in running order, as schedule() takes them
            num_tokens = min(seq.num_uncomputed_tokens, limit)
            if num_tokens < seq.num_uncomputed_tokens and not (limit_fixed and prompt_limit_binds):
                return None
            needed = self.blocks.num_blocks_needed(seq, num_tokens)
            if needed > free_blocks:  # schedule() would preempt, or have more blocks after N's finishes
                return None
            if num_tokens:
                chunks.append((seq, num_tokens))
            free_blocks -= needed
            limit -= num_tokens
        admitted: list[tuple[Sequence, int]] = []
        for seq in self.waiting:
            if limit == 0:
                return (chunks, admitted) if limit_fixed else None
            if len(decodes) + len(prompts) + len(admitted) >= self.max_num_seqs:
                return None if changeable else (chunks, admitted)
            if seq.adapter_key is not None and self.slots.slot_of(seq.adapter_key) is None:
                return None
            num_tokens = min(seq.num_uncomputed_tokens, limit)
            needed = self.blocks.num_blocks_needed(seq, num_tokens)
            if needed > free_blocks:
                return None if changeable else (chunks, admitted)
            if num_tokens < seq.num_uncomputed_tokens and not limit_fixed:
                return None
            admitted.append((seq, num_tokens))
            free_blocks -= needed
            limit -= num_tokens
        return chunks, admitted

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        slot_blocked = False
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            key = seq.adapter_key
            pages = 0 if key is None else self.pages_for(seq.adapter)
            if key is not None and (slot_blocked or not self.slots.can_admit(key, pages)):
                slot_blocked = True
                continue
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_allocate(seq, num_tokens):
                break  # memory is granted in arrival order
            self._admit(out, seq, num_tokens, pages)
            budget -= num_tokens

    def _admit(self, out: SchedulerOutput, seq: Sequence, num_tokens: int, pages: int) -> None:
        """A waiting request starts running: its adapter's slot pinned (loaded first where not resident), KV blocks
        for its first chunk."""
        if seq.adapter_key is not None:
            seq.slot, needs_load = self.slots.admit(seq.adapter_key, pages)
            if needs_load:
                out.slot_loads.append((seq.slot, seq.adapter))
        self.blocks.allocate(seq, num_tokens)
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        out.scheduled.append(self._chunk(seq, num_tokens))

    @staticmethod
    def _chunk(seq: Sequence, num_tokens: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, start, num_tokens, samples=start + num_tokens == len(seq.token_ids))

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq.slot != BASE_SLOT:
            self.slots.release(seq.slot)
            seq.slot = BASE_SLOT
        seq.num_computed_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's KV and slot; it recomputes its tokens when readmitted first in line."""
        self._release(seq)
        seq.status = SeqStatus.WAITING
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence and free everything it holds, at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
