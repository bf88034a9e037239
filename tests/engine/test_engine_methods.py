"""LoRA and PSOFT (PEFT folders) beside PiCa and base requests in the engine's continuous batching, with slot
churn between methods: each request equals a greedy run alone on its dense merged model (which the adapters'
tests check against PEFT's own forward). On CUDA the per-layer factors run in the Triton kernels
(adapters/lora_kernel.py) and PSOFT's cores in core_gathered, inside CUDA graphs."""

import random

import pytest
import torch
from peft import LoraConfig, PsoftConfig

from adapters.format import AdapterExpectation, load_adapter_dir
from cache.svd_factors import svd_factors_of
from server.engine.sampling import SamplingParams
from tests.engine.conftest import run_to_completion
from tests.helpers import save_peft_adapter


def add_peft_adapters(world, tmp_path):
    expect = AdapterExpectation.from_basis(world.basis, 8, svd_factors_of(world.loaded.model, world.basis), 8)
    kinds = {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "rslora": LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "up_proj"],
                             rank_pattern={"up_proj": 2}),
        "psoft": PsoftConfig(r=4, target_modules=["q_proj", "gate_proj"]),
    }
    for i, (name, config) in enumerate(kinds.items()):
        _, folder = save_peft_adapter(world.cfg.model, tmp_path / name, config, seed=20 + i)
        world.adapters[name] = load_adapter_dir(folder, expect)


def run_mixed(world, tmp_path, **engine_kw):
    add_peft_adapters(world, tmp_path)
    engine = world.engine(max_lora_rank=8, max_psoft_rank=8, max_gpu_adapters=3, max_num_seqs=8, max_num_batched_tokens=32, **engine_kw)
    rng = random.Random(3)
    choices = [None, "lora", "psoft", "a0", "rslora", "a1"]
    reqs = [(f"r{i}", choices[i % len(choices)], [rng.randrange(3, 250) for _ in range(rng.randint(1, 20))],
             rng.randint(1, 12)) for i in range(18)]
    for rid, adapter_id, prompt, max_tokens in reqs:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           world.handle(adapter_id))
    tokens, finish, stats = run_to_completion(engine)
    assert engine.slots.stats.evictions > 0, "slots must change hands between methods"
    for rid, adapter_id, prompt, max_tokens in reqs:
        assert tokens[rid] == world.greedy(adapter_id, prompt, max_tokens), (rid, adapter_id)
    return stats


def test_engine_serves_lora_psoft_pica_and_base_together(world_factory, tmp_path):
    run_mixed(world_factory(num_adapters=2), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_cuda_engine_serves_lora_psoft_pica_and_base_together(world_factory, tmp_path, cuda_graphs):
    world = world_factory(num_adapters=2, device="cuda", dtype="float32")
    stats = run_mixed(world, tmp_path, cuda_graphs=cuda_graphs)
    assert sum(s.batch_size for s in stats if s.num_prefill_tokens == 0) > 0, "decode-only steps ran"


def test_engine_without_lora_stacks_serves_psoft(world_factory, tmp_path):
    """PSOFT needs no LoRA stacks: a server with --max-lora-rank 0 and --max-psoft-rank serves it beside PiCa and base
    requests, each equal to its dense merged model."""
    world = world_factory(num_adapters=1)
    expect = AdapterExpectation.from_basis(world.basis, 0, svd_factors_of(world.loaded.model, world.basis), 6)
    _, folder = save_peft_adapter(world.cfg.model, tmp_path / "psoft", PsoftConfig(
        r=6, use_cayley_neumann=True, target_modules=["v_proj", "o_proj", "down_proj"]), seed=9)
    world.adapters["psoft"] = load_adapter_dir(folder, expect)
    engine = world.engine(max_lora_rank=0, max_psoft_rank=6, max_gpu_adapters=2)
    assert not engine.runner.adapted.slot_stacks.layer_a, "no LoRA stacks held"
    reqs = [(f"r{i}", adapter_id, [3 + 7 * i + j for j in range(5 + i)], 6)
            for i, adapter_id in enumerate(["psoft", None, "a0", "psoft"])]
    for rid, adapter_id, prompt, max_tokens in reqs:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           world.handle(adapter_id))
    tokens, _, _ = run_to_completion(engine)
    for rid, adapter_id, prompt, max_tokens in reqs:
        assert tokens[rid] == world.greedy(adapter_id, prompt, max_tokens), (rid, adapter_id)
    assert world.greedy("psoft", reqs[0][2], 6) != world.greedy(None, reqs[0][2], 6)
