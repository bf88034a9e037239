"""The messages between the HTTP front end and the engine-core process, msgpack-encoded by msgspec.

Typed structs, not pickle: either side decodes only these types. Front end -> core: requests, aborts
and adapter changes. Core -> front end: one `CoreReady` (or `CoreFailed`) at start, then one
`CoreUpdate` per step carrying every request's new tokens, the step's stats and current gauges.
"""

from __future__ import annotations

import msgspec

from adapters.targets import GroupInfo
from server.engine.engine import RequestOutput
from server.engine.sampling import SamplingParams
from server.engine.stats import EngineGauges, StepStats


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None
    adapter_version: str | None = None
    """The store's checksum the front end resolved; the core loads that version or fails the request."""


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]
    finish_reason: str = "abort"
    """What the core's stats record: 'stop' when the front end found a stop string in the text."""


class AdapterStored(msgspec.Struct, tag=True):
    """An upload landed in the store: the core reads it into its host cache ahead of the first request."""

    adapter_id: str
    version: str


class AdapterDeleted(msgspec.Struct, tag=True):
    """Gone from the store: the core forgets its host copy and GPU slot (running requests finish)."""

    adapter_id: str


class Shutdown(msgspec.Struct, tag=True):
    pass


ToCore = AddRequest | AbortRequests | AdapterStored | AdapterDeleted | Shutdown


class BasisInfo(msgspec.Struct):
    """What the front end needs of the basis (its identity and shapes); the P tensors stay in the core."""

    checksum: str
    kind: str
    rank_max: int
    groups: dict[str, GroupInfo]
    source: str
    seconds: float


class CoreReady(msgspec.Struct, tag=True):
    model_name: str
    model_load_seconds: float
    basis: BasisInfo
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    gauges: EngineGauges


class CoreFailed(msgspec.Struct, tag=True):
    """Start-up failed (bad model path, out of memory, ...): the message the operator needs."""

    message: str


class Rejected(msgspec.Struct):
    """A request the core refused before it ran; status is the HTTP status the front end answers."""

    request_id: str
    status: int
    message: str


class CoreUpdate(msgspec.Struct, tag=True):
    outputs: list[RequestOutput]
    stats: StepStats | None
    """None when the core handled messages without running a step (an abort freed a request, say)."""
    gauges: EngineGauges
    rejected: list[Rejected] = []
    disk_load_seconds: list[float] = []
    """Store-to-host-cache reads finished since the last update."""


FromCore = CoreReady | CoreFailed | CoreUpdate

encoder = msgspec.msgpack.Encoder()
to_core_decoder = msgspec.msgpack.Decoder(ToCore)
from_core_decoder = msgspec.msgpack.Decoder(FromCore)
