"""A request that fails inside the engine fails alone: the requests batched with it go on."""

import pytest

from server.engine.sampling import MAX_SEED, MIN_SEED, SamplingParams
from tests.engine.conftest import run_to_completion


@pytest.mark.parametrize("seed", [MAX_SEED + 1, MIN_SEED - 1])
def test_seeds_torch_refuses_are_refused_at_the_edge(seed):
    with pytest.raises(ValueError, match="seed must be in"):
        SamplingParams(temperature=1.0, seed=seed)


def test_the_extreme_seeds_sample(world_factory):
    engine = world_factory(num_adapters=0).engine()
    for i, seed in enumerate((MIN_SEED, MAX_SEED)):
        engine.add_request(f"s{i}", [3, 4, 5], SamplingParams(max_tokens=4, temperature=1.0, seed=seed, ignore_eos=True))
    _, finish, _ = run_to_completion(engine)
    assert finish == {"s0": "length", "s1": "length"}


def test_a_seed_the_generator_refuses_fails_its_request_at_admission(world_factory):
    engine = world_factory(num_adapters=0).engine()
    engine.add_request("ok", [3, 4, 5], SamplingParams(max_tokens=4, temperature=1.0, seed=1, ignore_eos=True))
    bad = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)
    object.__setattr__(bad, "seed", 2**70)  # as if the edge had let it through
    with pytest.raises(ValueError, match="cannot seed a generator"):
        engine.add_request("bad", [3, 4, 5], bad)
    _, finish, _ = run_to_completion(engine)
    assert finish == {"ok": "length"}


def test_a_failure_in_one_requests_step_work_fails_it_alone(world_factory):
    engine = world_factory(num_adapters=0).engine()
    params = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    for rid in ("a", "b", "c"):
        engine.add_request(rid, [3, 4, 5], params)

    def broken(token):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a detokenizer bug")

    engine._seqs["b"].detokenizer.add_token = broken
    tokens, finish, stats = run_to_completion(engine)
    assert finish == {"a": "length", "b": "error", "c": "length"}
    assert len(tokens["a"]) == len(tokens["c"]) == 6
    assert engine.blocks.num_used_blocks == 0 and not engine._seqs
    assert sorted(f.finish_reason for s in stats for f in s.finished) == ["error", "length", "length"]


def test_a_kv_override_too_small_for_one_full_length_sequence_is_refused(world_factory):
    """A --num-kv-blocks override must hold one max_model_len sequence, as the computed capacity must: else a
    request the edge accepts (prompt + max_tokens <= max_model_len) preempts itself every step, forever."""
    world = world_factory(num_adapters=0)
    with pytest.raises(RuntimeError, match="fewer than one 64-token sequence needs"):
        world.engine(num_kv_blocks=10, block_size=4, max_model_len=64)
    engine = world.engine(num_kv_blocks=16, block_size=4, max_model_len=64)
    engine.add_request("long", list(range(3, 43)), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    _, finish, _ = run_to_completion(engine, max_steps=500)
    assert finish == {"long": "length"}
