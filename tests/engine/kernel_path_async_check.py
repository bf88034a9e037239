"""Async scheduling on the CUDA path's code (our Triton decoder and attention, device-fed tokens, the varlen
metadata of steps with prompts), run where there is no GPU: in Triton's interpreter on the CPU, the step kernels
switched on (`uses_decode_kernels`). Tokens, text, finish reasons and logprobs equal the synchronous engine's on
a mixed workload, and on prompts arriving beside decodes, which the lookahead admits. Run by
test_kernel_path_async.py (TRITON_INTERPRET=1 set there when there is no GPU)."""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import server.engine.model_runner as model_runner  # noqa: E402
from server.config import ModelConfig  # noqa: E402
from tests.engine.conftest import World  # noqa: E402
from tests.engine.test_async_scheduling import (arrivals_script, assert_same, both, mixed_script,  # noqa: E402
                                                with_stops_that_hit)


def main() -> None:
    model_runner.uses_decode_kernels = lambda device: True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="kernel-path-async-"))

    def config_for(model_dir, rank_max=16, **kw):
        return ModelConfig(model=str(model_dir), rank_max=rank_max, cache_dir=tmp / "cache", device=device,
                           dtype="float32", **kw)

    world = World(tmp, config_for, 3)
    limits = dict(max_num_seqs=6, max_num_batched_tokens=24, max_gpu_adapters=2, cuda_graphs=False)
    script, aborted = mixed_script(world, 0, num_requests=12, last_arrival=30, abort_share=0.15)
    script, eos, _ = with_stops_that_hit(world, script, aborted, **limits)
    sync, fast, engine, _, _ = both(world, script, eos=eos, **limits)
    assert engine.runner.decode_kernels
    assert_same(sync, fast, aborted)
    assert engine.num_lookahead_steps > 5, engine.num_lookahead_steps
    print("mixed workload ok", engine.num_lookahead_steps, "lookahead steps")

    script = arrivals_script(world, eos_possible=True)
    sync, fast, engine, _, fast_stats = both(world, script, eos={1}, max_num_seqs=8, max_num_batched_tokens=64,
                                             cuda_graphs=False)
    assert_same(sync, fast)
    mixed = sum(1 for s in fast_stats if s.num_prefill_tokens and s.num_decode_tokens)
    assert mixed >= 8 and engine.num_lookahead_steps >= len(fast_stats) - 2, (mixed, engine.num_lookahead_steps)
    print("arrivals ok", engine.num_lookahead_steps, "of", len(fast_stats), "steps ahead")
    print("kernel path async ok")


if __name__ == "__main__":
    main()
