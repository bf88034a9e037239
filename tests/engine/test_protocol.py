"""The engine-core messages survive msgpack both ways, typed (no pickle), and bad frames are refused."""

import msgspec
import pytest

from adapters.targets import GroupInfo
from server.engine.engine import RequestOutput
from server.engine.protocol import (
    AbortRequests,
    AddRequest,
    BasisInfo,
    CoreReady,
    CoreUpdate,
    Rejected,
    encoder,
    from_core_decoder,
    to_core_decoder,
)
from server.engine.sampling import SamplingParams
from server.engine.sequence import TokenLogprob
from server.engine.stats import EngineGauges, FinishedRequest, StepStats


def test_requests_round_trip():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, seed=2**64 - 1, stop=("x",), logprobs=2)
    for message in (AddRequest("r1", [1, 2, 3], params, "tenant", "ab" * 32), AddRequest("r2", [4], SamplingParams()),
                    AbortRequests(["r1", "r2"], "stop")):
        assert to_core_decoder.decode(encoder.encode(message)) == message


def test_updates_round_trip():
    out = RequestOutput("r1", "tenant", "", (5,), (TokenLogprob(5, -0.25, ((5, -0.25), (9, -2.0))),), True, "length",
                        3, 1)
    stats = StepStats(1, 0, 1, 0, 0, 0, 2, 10, 1, 0, 0, (0.001,), (), (0.01,),
                      (FinishedRequest("tenant", "length", 3, 1, 0.5),), host_seconds=0.002, gpu_seconds=0.001)
    gauges = EngineGauges(num_running=1, running_adapter_ids=("tenant",), host_hits=3)
    update = CoreUpdate([out], stats, gauges, [Rejected("r9", 404, "adapter 'x' not found")], [0.02])
    assert from_core_decoder.decode(encoder.encode(update)) == update
    ready = CoreReady("m", 1.5, BasisInfo("c" * 64, "principal", 8, {"q_proj": GroupInfo("q_proj", 64, ("l.0.q",), (64,))},
                                          "computed", 0.1), 256, 300, [2], gauges)
    assert from_core_decoder.decode(encoder.encode(ready)) == ready


def test_a_bad_frame_is_refused_not_unpickled():
    with pytest.raises(msgspec.ValidationError):
        to_core_decoder.decode(encoder.encode({"type": "AddRequest", "request_id": 3}))
    with pytest.raises(msgspec.ValidationError):  # SamplingParams validates on decode too
        to_core_decoder.decode(encoder.encode(AddRequest("r", [1], SamplingParams()))
                               .replace(b"\xaamax_tokens\x10", b"\xaamax_tokens\x00"))
