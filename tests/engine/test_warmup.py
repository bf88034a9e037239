"""The start-up warm-up (a prefill-sized step, base and adapted) leaves the engine as it found it."""

import torch

from server.engine.sampling import SamplingParams
from server.engine.warmup import warm_up
from tests.engine.conftest import run_to_completion


def test_warm_up_runs_a_full_step_and_leaves_no_trace(world_factory):
    world = world_factory(num_adapters=2)
    engine = world.engine(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=40)
    stacks = engine.runner.adapted.slot_stacks
    assert warm_up(engine.runner, 64, 4) > 0
    index = engine.runner.adapted.slot_index
    assert index.num_tokens == 64 and index.any_adapter  # 40 + 24 tokens, the last pass on slot 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert all(not s.any() for s in stacks.stacks.values())
    requests = [("r0", None, [5, 9, 11], 6), ("r1", "a0", [7, 3], 5), ("r2", "a1", [4] * 20, 4)]
    for rid, adapter_id, prompt, max_tokens in requests:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           world.handle(adapter_id))
    tokens, _, _ = run_to_completion(engine)
    for rid, adapter_id, prompt, max_tokens in requests:
        assert tokens[rid] == world.greedy(adapter_id, prompt, max_tokens), rid
    assert torch.is_grad_enabled()
