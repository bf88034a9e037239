"""The CUDA fast path (grouped expand kernel, paged decode kernel, CUDA graphs) against the oracle."""

import random

import pytest
import torch

from server.engine.sampling import SamplingParams
from tests.engine.conftest import run_to_completion

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def requests(world, count, seed):
    rng = random.Random(seed)
    choices = [None] + sorted(world.adapters)
    return [(f"r{i}", choices[i % len(choices)], [rng.randrange(3, 250) for _ in range(rng.randint(1, 40))],
             rng.randint(1, 24)) for i in range(count)]


@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_engine_matches_dense_oracle_fp32(world_factory, cuda_graphs, arch):
    world = world_factory(num_adapters=6, arch=arch, device="cuda", dtype="float32")
    engine = world.engine(max_gpu_adapters=4, max_num_seqs=16, max_num_batched_tokens=64, cuda_graphs=cuda_graphs)
    assert (engine.runner.graphs is not None) == cuda_graphs and engine.runner.decode_kernels
    reqs = requests(world, 40, seed=1)
    for rid, adapter_id, prompt, max_tokens in reqs:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           world.handle(adapter_id))
    tokens, finish, stats = run_to_completion(engine)
    assert sum(s.batch_size for s in stats if s.num_prefill_tokens == 0) > 0, "decode-only steps ran"
    prefill_graphs = engine.runner.prefill_graphs
    assert (prefill_graphs is not None and prefill_graphs.steps_run > 0) == cuda_graphs, "steps with prompts replayed"
    for rid, adapter_id, prompt, max_tokens in reqs:
        assert tokens[rid] == world.greedy(adapter_id, prompt, max_tokens), (rid, adapter_id)


def test_cuda_steps_with_prompts_over_many_adapters_split_the_expand(world_factory):
    """Prompts of 16-40 tokens on 20 adapters, a step at a time beside the decodes: the per-token kernel is picked
    (more than 16 slots) and split, the prompts' slots to the tile kernel, through the piece graphs; tokens are
    the dense merged model's."""
    world = world_factory(num_adapters=20, device="cuda", dtype="float32")
    engine = world.engine(max_gpu_adapters=20, max_num_seqs=24, max_num_batched_tokens=128)
    index = engine.runner.adapted.slot_index
    splits = []
    set_slots = index.set

    def recording_set(*args, **kwargs):
        set_slots(*args, **kwargs)
        splits.append(index.split)

    index.set = recording_set
    rng = random.Random(3)
    reqs = [(f"r{i}", sorted(world.adapters)[i % 20], [rng.randrange(3, 250) for _ in range(rng.randint(16, 40))],
             rng.randint(20, 30)) for i in range(24)]
    for rid, adapter_id, prompt, max_tokens in reqs:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           world.handle(adapter_id))
    tokens, _, _ = run_to_completion(engine)
    assert any(splits) and engine.runner.prefill_graphs.steps_run > 0
    for rid, adapter_id, prompt, max_tokens in reqs:
        assert tokens[rid] == world.greedy(adapter_id, prompt, max_tokens), (rid, adapter_id)


def test_cuda_engine_bf16_logprobs_match_teacher_forced_hf(world_factory):
    world = world_factory(num_adapters=3, device="cuda", dtype="bfloat16")
    engine = world.engine(max_gpu_adapters=4, max_num_seqs=8)
    reqs = requests(world, 8, seed=2)
    for rid, adapter_id, prompt, _ in reqs:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0),
                           world.handle(adapter_id))
    got = {}
    while engine.has_work:
        for out in engine.step()[0]:
            got.setdefault(out.request_id, []).extend(out.logprobs)
    for rid, adapter_id, prompt, _ in reqs:
        generated = [lp.token_id for lp in got[rid]]
        model = world.reference_model(adapter_id)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + generated], device="cuda")).logits[0].float()
        ref = torch.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(1, torch.tensor(generated, device="cuda")[:, None])
        ours = torch.tensor([lp.logprob for lp in got[rid]], device="cuda")
        assert (ours - ref[:, 0]).abs().max() < 0.15, (rid, adapter_id)


def test_basis_cache_checksums_agree_on_cpu_and_gpu(world_factory):
    from cache.basis_cache import BasisCache, tensor_checksum

    world = world_factory(num_adapters=0, device="cuda", dtype="float32")
    cache = BasisCache(world.cfg.basis_dir)
    on_gpu = cache.load_or_compute(world.loaded.model, world.cfg.target_modules, 8, progress=False, device="cuda")
    on_cpu = cache.load_or_compute(world.loaded.model, world.cfg.target_modules, 8, progress=False, device="cpu")
    assert on_gpu.source == on_cpu.source == "loaded"
    for name, p in on_gpu.p.items():
        assert p.is_cuda and tensor_checksum(p) == tensor_checksum(on_cpu.p[name])
        assert torch.equal(p.cpu(), on_cpu.p[name])
