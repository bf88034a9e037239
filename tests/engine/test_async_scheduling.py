"""Async scheduling (step N+1 scheduled and launched before step N's tokens are read) gives the synchronous
engine's outputs: tokens, text, finish reasons and logprobs, on mixed workloads that cross every fallback
(prefill chunks, admissions, preemption, slot loads, aborts) and every way a request ends."""

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch

from cache.slot_table import SlotTable
from server.engine.block_manager import BlockManager
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence

STOP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "


def drive(engine, script: dict[int, list[tuple]], max_steps: int = 5000):
    """Run `script` (call index -> actions before that step() call: ('add', rid, prompt, params, handle) or
    ('abort', rid)) to the end; per request: tokens, text, finish reason, logprobs; and the step stats."""
    got = {}
    stats = []
    last = max(script, default=0)
    for call in range(max_steps):
        for action in script.get(call, ()):
            if action[0] == "add":
                engine.add_request(*action[1:])
                got[action[1]] = {"tokens": [], "text": "", "finish": None, "logprobs": []}
            else:
                engine.abort_request(action[1])
                if got[action[1]]["finish"] is None:
                    got[action[1]]["finish"] = "aborted here"
        if call > last and not engine.has_work:
            break
        if not engine.has_work:
            continue
        outputs, step_stats = engine.step()
        stats.append(step_stats)
        for out in outputs:
            record = got[out.request_id]
            assert record["finish"] is None, f"{out.request_id} got output after it ended"
            record["tokens"] += out.token_ids
            record["text"] += out.text
            record["logprobs"] += out.logprobs
            if out.finished:
                record["finish"] = out.finish_reason
    assert not engine.has_work, "engine did not drain"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engine.slots.num_pinned == 0 and not engine._seqs
    return got, stats


def random_params(rng: random.Random) -> SamplingParams:
    kind = rng.choice(["greedy", "greedy", "seeded", "seeded_top"])
    kw = dict(max_tokens=rng.randint(1, 20), ignore_eos=rng.random() < 0.3)
    if kind == "greedy":
        kw["temperature"] = 0
    else:
        kw.update(temperature=rng.choice([0.7, 1.0, 1.3]), seed=rng.randrange(2**31))
        if kind == "seeded_top":
            kw.update(top_p=0.9, top_k=rng.choice([0, 20]))
    if rng.random() < 0.3:
        kw["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.3:
        kw["stop_token_ids"] = (rng.randrange(3, 250),)
    if rng.random() < 0.4:
        kw["stop"] = tuple(rng.sample(STOP_CHARS, 3)) + ("".join(rng.sample(STOP_CHARS, 2)),)
    return SamplingParams(**kw)


def mixed_script(world, seed: int, num_requests: int, last_arrival: int, abort_share: float):
    rng = random.Random(seed)
    choices = [None] + sorted(world.adapters)
    script, aborted = {}, set()
    for i in range(num_requests):
        rid = f"r{i}"
        arrival = rng.randint(0, last_arrival)
        prompt = [rng.randrange(3, 250) for _ in range(rng.randint(1, 40))]
        handle = world.handle(choices[i % len(choices)])
        script.setdefault(arrival, []).append(("add", rid, prompt, random_params(rng), handle))
        if rng.random() < abort_share:
            script.setdefault(arrival + rng.randint(1, 12), []).append(("abort", rid))
            aborted.add(rid)
    return script, aborted


def with_stops_that_hit(world, script, aborted, **engine_kw):
    """The script with stop strings, stop token ids and EOS taken from the middle of each request's own output in a
    first run with none (each kind on a quarter of the requests, the last quarter ends by length), so that every
    way of ending occurs; returns (script, eos ids, the kind each request got)."""
    plain = {call: [(a[0], a[1], a[2], dataclasses.replace(a[3], stop=(), stop_token_ids=(), ignore_eos=True), a[4])
                    if a[0] == "add" else a for a in actions] for call, actions in script.items()}
    first, _ = drive(world.engine(async_scheduling=False, **engine_kw), plain)
    eos, kinds, rng = set(), {}, random.Random(len(first))
    for i, rid in enumerate(sorted(first, key=lambda r: int(r[1:]))):
        tokens, text = first[rid]["tokens"], first[rid]["text"]
        kinds[rid] = ["stop_str", "stop_id", "eos", "length"][i % 4] if rid not in aborted and len(tokens) > 3 else "length"
        if kinds[rid] == "stop_str" and len(text) < 4:
            kinds[rid] = "length"
        if kinds[rid] == "eos":
            eos.add(tokens[rng.randrange(1, len(tokens) - 1)])
    eos_free = {rid for rid in first if kinds[rid] != "eos"}

    def params_for(rid, params):
        tokens, text = first[rid]["tokens"], first[rid]["text"]
        kind = kinds[rid]
        if kind == "stop_str":
            k = rng.randrange(1, len(text) - 2)
            return dataclasses.replace(params, stop=(text[k : k + 2], "never there"), stop_token_ids=(), ignore_eos=True)
        if kind == "stop_id":
            return dataclasses.replace(params, stop=(), stop_token_ids=(tokens[rng.randrange(1, len(tokens) - 1)],),
                                       ignore_eos=True)
        return dataclasses.replace(params, stop=(), stop_token_ids=(), ignore_eos=rid in eos_free)

    stopped = {call: [(a[0], a[1], a[2], params_for(a[1], a[3]), a[4]) if a[0] == "add" else a for a in actions]
               for call, actions in plain.items()}
    return stopped, eos, kinds


def both(world, script, eos=None, **engine_kw):
    """The script on a synchronous and on an async engine: (sync results, async results, async engine, stats)."""
    runs = []
    for async_scheduling in (False, True):
        engine = world.engine(async_scheduling=async_scheduling, **engine_kw)
        assert engine.async_scheduling is async_scheduling
        if eos is not None:
            engine.limits = dataclasses.replace(engine.limits, eos_token_ids=frozenset(eos))
        got, stats = drive(engine, script)
        runs.append((got, stats, engine))
    (sync, sync_stats, _), (fast, fast_stats, engine) = runs
    return sync, fast, engine, sync_stats, fast_stats


def assert_same(sync: dict, fast: dict, aborted=frozenset()) -> None:
    assert sync.keys() == fast.keys()
    for rid in sync:
        a, b = sync[rid], fast[rid]
        if rid in aborted and "aborted here" in (a["finish"], b["finish"]):
            # an arrival shifts the async schedule by a step, so an abort may cut at another token: prefixes
            shorter, longer = sorted((a["tokens"], b["tokens"]), key=len)
            assert longer[: len(shorter)] == shorter, rid
            continue
        assert a["tokens"] == b["tokens"], rid
        assert a["finish"] == b["finish"] and a["text"] == b["text"], rid
        assert [lp.token_id for lp in a["logprobs"]] == [lp.token_id for lp in b["logprobs"]], rid
        for x, y in zip(a["logprobs"], b["logprobs"]):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.parametrize("seed", [0, 1])
def test_async_equals_sync_on_a_mixed_workload(world_factory, seed):
    world = world_factory(num_adapters=5)
    limits = dict(max_num_seqs=10, max_num_batched_tokens=16, max_gpu_adapters=2)
    script, aborted = mixed_script(world, seed, num_requests=28, last_arrival=80, abort_share=0.15)
    script, eos, kinds = with_stops_that_hit(world, script, aborted, **limits)
    sync, fast, engine, _, _ = both(world, script, eos=eos, **limits)
    assert_same(sync, fast, aborted)
    ended = {kinds[rid] for rid, r in sync.items() if r["finish"] == "stop"}
    assert ended == {"stop_str", "stop_id", "eos"}, ended  # each way of stopping early occurred
    assert any(r["finish"] == "length" for r in sync.values())
    assert engine.slots.stats.evictions > 0, "slot churn: loads happened between lookahead steps"
    assert engine.num_lookahead_steps > 10, engine.num_lookahead_steps


def test_async_equals_sync_under_kv_preemption(world_factory):
    world = world_factory(num_adapters=3)
    rng = random.Random(3)
    script = {0: [("add", f"r{i}", [rng.randrange(3, 250) for _ in range(8)], random_params(rng),
                   world.handle([None, "a0", "a1", "a2"][i % 4])) for i in range(8)]}
    eos = rng.sample(range(3, 250), 4)
    sync, fast, engine, sync_stats, fast_stats = both(world, script, eos=eos, num_kv_blocks=8, block_size=4,
                                                      max_model_len=32, max_num_seqs=8)
    assert_same(sync, fast)
    assert sum(s.num_preempted for s in fast_stats) > 0 and engine.num_lookahead_steps > 0



@pytest.mark.parametrize("kv", [{}, dict(num_kv_blocks=16, block_size=4, max_model_len=64)])
def test_async_equals_sync_with_a_prompt_budget_beside_decodes(world_factory, kv):
    """--max-prefill-tokens-with-decodes 3: prompts (and, under KV pressure, recomputes) spread over steps
    that decode; the lookahead must still be exactly the step schedule() would make."""
    world = world_factory(num_adapters=3)
    limits = dict(max_num_seqs=8, max_num_batched_tokens=16, max_gpu_adapters=2, max_prefill_tokens_with_decodes=3,
                  **kv)
    script, aborted = mixed_script(world, 5, num_requests=20, last_arrival=60, abort_share=0.1)
    script, eos, _ = with_stops_that_hit(world, script, aborted, **limits)
    sync, fast, engine, sync_stats, fast_stats = both(world, script, eos=eos, **limits)
    assert_same(sync, fast, aborted)
    assert engine.num_lookahead_steps > 0, engine.num_lookahead_steps  # few: prompts spread over more steps
    assert all(s.num_prefill_tokens <= 3 for s in sync_stats + fast_stats if s.num_decode_tokens)
    assert any(s.num_prefill_tokens > 3 for s in sync_stats)  # steps with nothing decoding use the whole budget
    if kv:
        assert sum(s.num_preempted for s in fast_stats) > 0

def test_aborts_mid_flight_cut_at_the_same_token(world_factory):
    """No arrival after the start: the async schedule is the synchronous one, so an abort before step k cuts
    both engines after the same token, although the async engine has step k's token in flight then."""
    world = world_factory(num_adapters=2)
    rng = random.Random(4)
    adds = [("add", f"r{i}", [rng.randrange(3, 250) for _ in range(rng.randint(1, 12))],
             SamplingParams(max_tokens=30, temperature=0 if i % 2 else 1.0, seed=i, ignore_eos=True),
             world.handle([None, "a0", "a1"][i % 3])) for i in range(6)]
    script = {0: adds, 4: [("abort", "r0")], 7: [("abort", "r3"), ("abort", "r4")], 9: [("abort", "r1")]}
    sync, fast, engine, sync_stats, fast_stats = both(world, script, max_num_seqs=8, max_num_batched_tokens=64)
    assert_same(sync, fast)  # aborted ones included
    assert all(len(sync[r]["tokens"]) < 30 for r in ("r0", "r1", "r3", "r4"))
    assert engine.num_lookahead_steps > 20


def test_lookahead_runs_while_requests_wait_behind_a_full_batch(world_factory):
    """Nothing can finish but by length, so what the queue gets after each step is known: the lookahead goes
    on with requests waiting, and every step is the synchronous engine's step."""
    world = world_factory(num_adapters=1)
    rng = random.Random(5)
    script = {0: [("add", f"r{i}", [rng.randrange(3, 250) for _ in range(rng.randint(1, 20))],
                   SamplingParams(max_tokens=rng.randint(3, 12), temperature=0, ignore_eos=True),
                   world.handle(None if i % 2 else "a0")) for i in range(7)]}
    sync, fast, engine, sync_stats, fast_stats = both(world, script, max_num_seqs=2, max_num_batched_tokens=32)
    assert_same(sync, fast)
    def steps(stats):
        return [(s.batch_size, s.num_prefill_tokens, s.num_decode_tokens, s.num_waiting) for s in stats]

    assert steps(sync_stats) == steps(fast_stats)
    assert engine.num_lookahead_steps > len(fast_stats) // 2


def lookahead_after_two_prompts(waiting: list[tuple[int, str | None]], may_finish: bool, prefill_limit: int = 64):
    """A scheduler whose two running requests ("a0" and the base model) each have a token pending in step N,
    `waiting` ((prompt length, adapter id) each) queued behind them, room for three; its lookahead for N+1."""
    adapter = lambda name: None if name is None else SimpleNamespace(key=(name, 0), adapter_id=name)  # noqa: E731
    scheduler = Scheduler(3, 64, BlockManager(32, 4), SlotTable(4), prefill_limit)
    for i, name in enumerate(["a0", None]):
        scheduler.add(Sequence(f"run{i}", [3] * 5, SamplingParams(max_tokens=9), adapter(name), None))
    for item in scheduler.schedule().scheduled:  # step N computes both prompts and samples for both
        item.seq.num_computed_tokens += item.num_tokens
    for i, (length, name) in enumerate(waiting):
        scheduler.add(Sequence(f"new{i}", [4] * length, SamplingParams(max_tokens=9), adapter(name), None))
    out = scheduler.schedule_lookahead(lambda seq: True, lambda seq: False, lambda seq: may_finish)
    return None if out is None else [(item.seq.request_id, item.num_tokens) for item in out.scheduled]


def test_lookahead_admits_only_what_any_outcome_of_the_step_would_admit():
    decodes = [("run0", 1), ("run1", 1)]
    # nothing can finish at N: the one free place is taken, the second request waits either way
    assert lookahead_after_two_prompts([(6, None), (3, None)], may_finish=False) == decodes + [("new0", 6)]
    # EOS could end a decode at N and free a place for the second: only schedule() after N knows
    assert lookahead_after_two_prompts([(6, None), (3, None)], may_finish=True) is None
    # every waiting request fits whatever N samples
    assert lookahead_after_two_prompts([(6, None)], may_finish=True) == decodes + [("new0", 6)]
    # a resident adapter is pinned again; one that would load waits for schedule()
    assert lookahead_after_two_prompts([(6, "a0")], may_finish=True) == decodes + [("new0", 6)]
    assert lookahead_after_two_prompts([(6, "a1")], may_finish=False) is None
    # a prompt cut by the budget for prompts beside decodes: that budget stays unless every decode could end
    assert lookahead_after_two_prompts([(9, None)], may_finish=False, prefill_limit=4) == decodes + [("new0", 4)]
    assert lookahead_after_two_prompts([(9, None)], may_finish=True, prefill_limit=4) is None


def lookahead_with_a_prompt_part_way(prompt_len: int, may_finish: bool, prefill_limit: int):
    """Step N computed two 5-token prompts (a token pending for each) and the first 4 tokens of `prompt_len`, as the
    step's 14-token budget allowed; the lookahead for N+1."""
    scheduler = Scheduler(4, 14, BlockManager(32, 4), SlotTable(4), prefill_limit)
    for name, length in (("run0", 5), ("run1", 5), ("long", prompt_len)):
        scheduler.add(Sequence(name, [3] * length, SamplingParams(max_tokens=9), None, None))
    step = scheduler.schedule()  # nothing decodes yet: the whole budget
    assert [(item.seq.request_id, item.num_tokens) for item in step.scheduled] == [("run0", 5), ("run1", 5), ("long", 4)]
    for item in step.scheduled:
        item.seq.num_computed_tokens += item.num_tokens
    out = scheduler.schedule_lookahead(lambda seq: seq.request_id != "long", lambda seq: False,
                                       lambda seq: may_finish)
    return None if out is None else [(item.seq.request_id, item.num_tokens) for item in out.scheduled]


def test_lookahead_goes_on_with_a_prompt_part_way_through():
    """A prompt that N did not finish takes its next chunk from the host, sized as schedule() would size it."""
    decodes = [("run0", 1), ("run1", 1)]
    # the rest fits in the budget left beside the decodes: the same chunk whatever N samples
    assert lookahead_with_a_prompt_part_way(12, may_finish=True, prefill_limit=64) == decodes + [("long", 8)]
    # cut by the budget for prompts beside decodes: it stays unless every decode could end at N
    assert lookahead_with_a_prompt_part_way(12, may_finish=False, prefill_limit=4) == decodes + [("long", 4)]
    assert lookahead_with_a_prompt_part_way(12, may_finish=True, prefill_limit=4) is None
    # cut by the whole step's budget: schedule() sizes it by where it stands among the decodes
    assert lookahead_with_a_prompt_part_way(20, may_finish=False, prefill_limit=64) is None


def arrivals_script(world, eos_possible: bool) -> dict:
    """Three streams (base model, "a0", "a1") decode 40 tokens while ten short requests arrive, one every third
    step() call from the fourth (both adapters are resident by then)."""
    rng = random.Random(7)
    handles = [None, "a0", "a1"]
    params = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=not eos_possible)  # noqa: E731
    script = {0: [("add", f"s{i}", [rng.randrange(3, 250) for _ in range(5)], params(40), world.handle(handles[i % 3]))
                  for i in range(3)]}
    for call in range(4, 34, 3):
        script[call] = [("add", f"n{call}", [rng.randrange(3, 250) for _ in range(rng.randint(2, 9))], params(4),
                         world.handle(handles[call % 3]))]
    return script


@pytest.mark.parametrize("eos_possible,prefill_limit", [(False, None), (True, None), (False, 3)])
def test_prompts_arriving_beside_decodes_are_launched_ahead(world_factory, eos_possible, prefill_limit):
    """The serving steady state: streams decode while fresh requests arrive (base model and resident adapters).
    Each new prompt is admitted by the lookahead beside the decodes, so the steps that carry one do not wait for
    the step before; with EOS possible as well, since every waiting request fits, so N's finishes cannot change
    what is admitted; and with prompts cut into chunks of 3 beside the decodes, each chunk after the first
    launched ahead too. Tokens are the synchronous engine's."""
    world = world_factory(num_adapters=2)
    script = arrivals_script(world, eos_possible)
    launched = []  # (launched ahead, prompt tokens) per step
    limits = dict(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_tokens_with_decodes=prefill_limit)
    engine = world.engine(async_scheduling=True, **limits)
    launch = engine._launch

    def recording_launch(scheduled, after, call_start):
        prompt = sum(min(item.num_tokens, item.seq.num_prompt_tokens - item.start) for item in scheduled[0].scheduled
                     if item.start < item.seq.num_prompt_tokens)
        launched.append((after is not None, prompt))
        return launch(scheduled, after, call_start)

    engine._launch = recording_launch
    reference = world.engine(async_scheduling=False, **limits)
    if eos_possible:
        for e in (engine, reference):
            e.limits = dataclasses.replace(e.limits, eos_token_ids=frozenset({1}))
    (fast, _), (sync, _) = drive(engine, script), drive(reference, script)
    assert_same(sync, fast)
    ahead = [n for is_ahead, n in launched if is_ahead]
    waited = [n for is_ahead, n in launched if not is_ahead]
    assert sum(1 for n in ahead if n) >= 10, (ahead, waited)  # each arrival's prompt (in chunks: each chunk)
    assert sum(ahead) == sum(len(add[2]) for adds in list(script.values())[1:] for add in adds)
    assert waited[0] > 0 and not any(waited[1:]), waited  # only the first wave waited


def test_a_finished_requests_wasted_lookahead_token_is_dropped(world_factory):
    """EOS at step N is only seen after N+1 was launched with the request in it: N+1's token for it is
    computed, never emitted, and its KV blocks go back."""
    world = world_factory(num_adapters=0)
    params = SamplingParams(max_tokens=40, temperature=0)
    ref = world.engine(async_scheduling=False)
    ref_got, _ = drive(ref, {0: [("add", "x", [3, 4, 5], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                                  None)]})
    eos = ref_got["x"]["tokens"][6]
    script = {0: [("add", "x", [3, 4, 5], params, None),
                  ("add", "long", [9, 8], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), None)]}
    sync, fast, engine, sync_stats, fast_stats = both(world, script, eos=[eos])
    assert_same(sync, fast)
    ref_tokens = ref_got["x"]["tokens"]
    assert fast["x"]["finish"] == "stop" and fast["x"]["tokens"] == ref_tokens[: ref_tokens.index(eos) + 1]
    # the async engine ran one more row than the synchronous one: the dropped token
    assert sum(s.batch_size for s in fast_stats) == sum(s.batch_size for s in sync_stats) + 1


def test_async_scheduling_defaults_off_on_cpu(world_factory):
    world = world_factory(num_adapters=0)
    assert world.engine().async_scheduling is False
    assert world.engine(async_scheduling=True).async_scheduling is True


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_async_equals_sync_on_a_mixed_workload(world_factory, cuda_graphs, seed):
    """fp32, so that the wasted rows (a batch one row larger) cannot move a greedy argmax."""
    world = world_factory(num_adapters=5, device="cuda", dtype="float32")
    limits = dict(max_num_seqs=12, max_num_batched_tokens=32, max_gpu_adapters=3, cuda_graphs=cuda_graphs)
    script, aborted = mixed_script(world, seed, num_requests=40, last_arrival=100, abort_share=0.15)
    script, eos, _ = with_stops_that_hit(world, script, aborted, **limits)
    sync, fast, engine, _, fast_stats = both(world, script, eos=eos, **limits)
    assert (engine.runner.graphs is not None) == cuda_graphs and engine.runner.decode_kernels
    assert_same(sync, fast, aborted)
    assert engine.num_lookahead_steps > 10
    decode = [s for s in fast_stats if s.batch_size and not s.num_prefill_tokens]
    assert decode and all(s.gpu_seconds > 0 for s in decode)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_cuda_bf16_async_steps_are_the_sync_steps(world_factory, cuda_graphs):
    """Nothing finishes but by length: the async schedule is the synchronous one step for step, so even in bf16
    (where what shares a batch moves the numerics) tokens and logprobs are bit for bit the same."""
    world = world_factory(num_adapters=4, device="cuda", dtype="bfloat16")
    rng = random.Random(6)
    choices = [None] + sorted(world.adapters)
    script = {0: [("add", f"r{i}", [rng.randrange(3, 250) for _ in range(rng.randint(1, 30))],
                   SamplingParams(max_tokens=rng.randint(4, 24), temperature=0 if i % 3 else 0.9, seed=i,
                                  ignore_eos=True, logprobs=2 if i % 4 == 0 else None),
                   world.handle(choices[i % len(choices)])) for i in range(40)]}
    sync, fast, engine, sync_stats, fast_stats = both(world, script, max_num_seqs=16, max_num_batched_tokens=64,
                                                      max_gpu_adapters=4, cuda_graphs=cuda_graphs)
    def steps(stats):
        return [(s.batch_size, s.num_prefill_tokens, s.num_decode_tokens) for s in stats]

    assert steps(sync_stats) == steps(fast_stats)
    for rid in sync:
        assert sync[rid]["tokens"] == fast[rid]["tokens"], rid
        assert [lp.logprob for lp in sync[rid]["logprobs"]] == [lp.logprob for lp in fast[rid]["logprobs"]], rid
    assert engine.num_lookahead_steps > len(fast_stats) // 2
