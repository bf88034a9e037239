import asyncio

import pytest
import torch

from cache.host_cache import HostCache
from server.engine.async_engine import AsyncEngine, QueueFullError
from server.engine.sampling import SamplingParams
from tests.engine.conftest import run_to_completion

GREEDY = dict(temperature=0, ignore_eos=True)


def test_fewer_slots_than_adapters_in_flight_all_complete(world_factory):
    world = world_factory(num_adapters=6)
    engine = world.engine(max_gpu_adapters=2, max_num_seqs=8)
    for i in range(12):
        engine.add_request(f"r{i}", [5 + i, 6, 7], SamplingParams(max_tokens=4, **GREEDY), world.handle(f"a{i % 6}"))
    tokens, finish, stats = run_to_completion(engine)
    assert len(finish) == 12 and set(finish.values()) == {"length"}
    assert max(s.batch_size for s in stats) <= 8
    for i in range(12):
        assert tokens[f"r{i}"] == world.greedy(f"a{i % 6}", [5 + i, 6, 7], 4)


def test_rank_pages_bound_residency_and_outputs_stay_exact(world_factory):
    """Four slots but a pool of two rank pages (the tiny model's pages are 8 columns, every adapter here takes one):
    adapters wait for pages and are evicted by them, and every output still matches its dense merged model."""
    world = world_factory(num_adapters=6)
    engine = world.engine(max_gpu_adapters=4, adapter_pool_ranks=16, max_num_seqs=8)
    assert (engine.slots.num_pages, engine.runner.adapted.slot_stacks.page) == (2, 8)
    for i in range(12):
        engine.add_request(f"r{i}", [5 + i, 6, 7], SamplingParams(max_tokens=4, **GREEDY), world.handle(f"a{i % 6}"))
    resident = []
    tokens, finish, _ = run_to_completion(engine, before_step=lambda _: resident.append(engine.slots.num_resident))
    assert len(finish) == 12 and max(resident) == 2 and engine.slots.stats.evictions >= 4
    for i in range(12):
        assert tokens[f"r{i}"] == world.greedy(f"a{i % 6}", [5 + i, 6, 7], 4)


def test_slot_blocked_head_is_not_starved(world_factory):
    world = world_factory(num_adapters=2)
    engine = world.engine(max_gpu_adapters=1, max_num_seqs=8)
    first_step = {}
    engine.add_request("long-a0", [3, 4], SamplingParams(max_tokens=6, **GREEDY), world.handle("a0"))
    engine.step()
    engine.add_request("head-a1", [3, 4], SamplingParams(max_tokens=2, **GREEDY), world.handle("a1"))
    engine.add_request("later-a0", [3, 4], SamplingParams(max_tokens=2, **GREEDY), world.handle("a0"))
    engine.add_request("later-base", [3, 4], SamplingParams(max_tokens=2, **GREEDY), None)
    step = 1
    while engine.has_work:
        outputs, _ = engine.step()
        for out in outputs:
            first_step.setdefault(out.request_id, step)
        step += 1
    # the base request passes the blocked head; the a0 request does not
    assert first_step["later-base"] < first_step["head-a1"] < first_step["later-a0"]


def test_abort_frees_kv_and_slot_pins(world_factory):
    world = world_factory(num_adapters=2)
    engine = world.engine()
    engine.add_request("x", list(range(3, 40)), SamplingParams(max_tokens=50, **GREEDY), world.handle("a0"))
    engine.add_request("y", [3, 4, 5], SamplingParams(max_tokens=50, **GREEDY), world.handle("a1"))
    for _ in range(4):
        engine.step()
    assert engine.blocks.num_used_blocks > 0 and engine.slots.num_pinned == 2
    assert engine.abort_request("x") and engine.abort_request("y")
    assert not engine.abort_request("y")
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engine.slots.num_pinned == 0 and not engine.has_work


def test_async_stream_cancel_frees_everything(world_factory):
    world = world_factory(num_adapters=1)
    engine = world.engine()
    async_engine = AsyncEngine(engine, max_queue=4)
    async_engine.start()

    async def main():
        received = 0
        stream = async_engine.submit("s", [3, 4, 5], SamplingParams(max_tokens=100, **GREEDY), world.handle("a0"))
        iterator = aiter(stream)
        async for _ in iterator:
            received += 1
            if received == 2:
                break
        await iterator.aclose()  # what a client disconnect does to a streaming response
        for _ in range(1500):  # up to 30 s; returns as soon as the engine drains
            if not engine.has_work:
                break
            await asyncio.sleep(0.02)
        return received

    try:
        assert asyncio.run(main()) == 2
        assert not engine.has_work
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and engine.slots.num_pinned == 0
    finally:
        async_engine.shutdown()


def test_async_queue_full_and_bad_request(world_factory):
    world = world_factory(num_adapters=0)
    async_engine = AsyncEngine(world.engine(max_model_len=64, max_num_seqs=1), max_queue=1)  # not started: nothing drains

    async def first(prompt, max_tokens=4):
        stream = async_engine.submit(f"id{len(prompt)}", prompt, SamplingParams(max_tokens=max_tokens))
        return await asyncio.wait_for(aiter(stream).__anext__(), 0.2)

    async def main():
        with pytest.raises(ValueError, match="more than this model's context length 64"):
            await first([3] * 60, max_tokens=10)
        with pytest.raises(ValueError, match="the prompt is empty"):
            await first([])
        for prompt in ([3, 4], [3, 4, 5]):  # one for the batch, one for the queue (never run here)
            with pytest.raises(asyncio.TimeoutError):
                await first(prompt)
        with pytest.raises(QueueFullError, match="the server is full"):
            await first([3, 4, 5, 6])

    asyncio.run(main())


def test_a_burst_fills_the_batch_and_the_queue_before_refusing(world_factory):
    world = world_factory(num_adapters=0)
    async_engine = AsyncEngine(world.engine(max_num_seqs=8), max_queue=8)  # not started: the burst sits in the inbox

    async def burst():
        admitted = refused = 0
        for i in range(40):
            try:
                async_engine.submit(f"b{i}", [3, 4], SamplingParams(max_tokens=4))
                admitted += 1
            except QueueFullError:
                refused += 1
        return admitted, refused

    assert asyncio.run(burst()) == (16, 24)


def test_host_cache_evicts_and_reloads_from_disk(tmp_path, world_factory):
    from adapters.format import AdapterExpectation, load_adapter_dir
    from tests.helpers import write_random_adapter

    world = world_factory(num_adapters=0)
    expect = AdapterExpectation.from_basis(world.basis)
    for i in range(3):
        write_random_adapter(tmp_path / "store" / f"d{i}", world.basis, r=4, seed=i)
    reads = []

    def load(adapter_id):
        reads.append(adapter_id)
        return load_adapter_dir(tmp_path / "store" / adapter_id, expect)

    host = HostCache(load, max_adapters=2, dtype=torch.float32, pin_memory=False)
    h0 = host.get("d0")
    host.get("d1")
    assert host.get("d0") is h0  # hit
    host.get("d2")  # evicts d1 (least recently used)
    assert "d1" not in host and "d0" in host and host.stats.evictions == 1
    again = host.get("d1")  # reloaded from disk
    assert reads == ["d0", "d1", "d2", "d1"] and (host.stats.hits, host.stats.misses) == (1, 4)
    assert torch.equal(again.tensors["q_proj"], load("d1").slot_tensors()["q_proj"])


def test_reupload_while_running_keeps_each_request_on_its_version(world_factory):
    world = world_factory(num_adapters=2)
    engine = world.engine()
    old = world.host.handle_for("tenant", world.adapters["a0"])  # same adapter id, two versions
    new = world.host.handle_for("tenant", world.adapters["a1"])
    assert old.key != new.key
    params = SamplingParams(max_tokens=8, **GREEDY)
    engine.add_request("old", [3, 4, 5], params, old)
    early = [t for _ in range(2) for out in engine.step()[0] for t in out.token_ids]
    engine.drop_adapter("tenant")  # deleted and re-uploaded while "old" runs
    engine.add_request("new", [3, 4, 5], params, new)
    tokens, finish, _ = run_to_completion(engine)
    assert early + tokens["old"] == world.greedy("a0", [3, 4, 5], 8)
    assert tokens["new"] == world.greedy("a1", [3, 4, 5], 8)
    assert tokens["old"] != tokens["new"]


def test_prompts_beside_decodes_stay_under_the_prefill_budget(world_factory):
    """A wave of prompts arriving while streams decode is spread over steps of at most
    max_prefill_tokens_with_decodes prompt tokens, every one of them decoding too; with nothing decoding the
    whole budget is used. Tokens match the oracle either way."""
    world = world_factory(num_adapters=1)
    engine = world.engine(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_tokens_with_decodes=8)
    prompts = {f"r{i}": [3 + i + j for j in range(10 + i)] for i in range(6)}
    for rid in ("r0", "r1"):
        engine.add_request(rid, prompts[rid], SamplingParams(max_tokens=12, **GREEDY), world.handle("a0"))

    def arrive(step):
        if step == 1:
            for rid in ("r2", "r3", "r4", "r5"):
                engine.add_request(rid, prompts[rid], SamplingParams(max_tokens=3, **GREEDY), None)

    tokens, finish, stats = run_to_completion(engine, before_step=arrive)
    assert stats[0].num_prefill_tokens == 10 + 11 and stats[0].num_decode_tokens == 0
    with_prompts = [s for s in stats[1:] if s.num_prefill_tokens]
    assert sum(s.num_prefill_tokens for s in with_prompts) == sum(len(prompts[f"r{i}"]) for i in range(2, 6))
    assert len(with_prompts) >= 7 and all(s.num_prefill_tokens <= 8 and s.num_decode_tokens for s in with_prompts)
    assert set(finish) == set(prompts) and set(finish.values()) == {"length"}
    for rid, prompt in prompts.items():
        first = rid in ("r0", "r1")
        assert tokens[rid] == world.greedy("a0" if first else None, prompt, 12 if first else 3)


def test_recompute_chunks_of_one_token_count_as_prompt_tokens(world_factory):
    """Under KV pressure with a prompt budget of 1 beside decodes, preempted sequences (which have output tokens)
    recompute one token a step; those tokens are prompt tokens in the stats, as the scheduler budgets them, not
    decodes: a step's decodes each sample a token. Tokens still match the oracle."""
    world = world_factory(num_adapters=1)
    engine = world.engine(num_kv_blocks=8, block_size=4, max_model_len=32, max_num_seqs=8,
                          max_prefill_tokens_with_decodes=1)
    prompts = {f"r{i}": [3 + 7 * i + j for j in range(6)] for i in range(6)}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=10, **GREEDY), world.handle("a0"))
    tokens, steps = {}, []
    for _ in range(2000):
        if not engine.has_work:
            break
        outputs, stats = engine.step()
        steps.append((stats, len(outputs)))
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert not engine.has_work and sum(s.num_preempted for s, _ in steps) > 0
    assert all(s.num_decode_tokens <= num_outputs for s, num_outputs in steps)
    assert all(s.num_prefill_tokens <= 1 for s, _ in steps if s.num_decode_tokens)
    for rid, prompt in prompts.items():
        assert tokens[rid] == world.greedy("a0", prompt, 10)
