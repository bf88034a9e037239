"""One request's state inside the engine: its tokens, KV blocks, adapter slot and output so far."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from cache.host_cache import AdapterHandle
from cache.slot_table import BASE_SLOT
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: AdapterHandle | None
    detokenizer: IncrementalDetokenizer | None
    """None where the front end detokenizes (the engine-core process)."""
    arrival_time: float = field(default_factory=time.monotonic)

    token_ids: list[int] = field(init=False)
    status: SeqStatus = field(default=SeqStatus.WAITING, init=False)
    num_computed_tokens: int = field(default=0, init=False)
    """Tokens whose K/V are in the cache."""
    block_table: list[int] = field(default_factory=list, init=False)
    slot: int = field(default=BASE_SLOT, init=False)
    logprobs: list[TokenLogprob] = field(default_factory=list, init=False)
    finish_reason: str | None = field(default=None, init=False)
    first_token_time: float | None = field(default=None, init=False)
    last_token_time: float | None = field(default=None, init=False)

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def adapter_key(self):
        return self.adapter.key if self.adapter else None

    @property
    def adapter_id(self) -> str | None:
        return self.adapter.adapter_id if self.adapter else None

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
