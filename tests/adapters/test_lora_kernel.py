from pathlib import Path

import pytest
import torch

from tests.helpers import run_kernel_check


def test_lora_kernels_match_reference():
    run_kernel_check(Path(__file__).with_name("lora_kernel_check.py"), "lora kernel ok")


def test_lora_kernels_compile_for_sm90_without_spills():
    """The configs lora_grouped picks lower to sm_90 code (ptxas, no GPU needed) and keep every kernel in registers."""
    pytest.importorskip("triton")
    from tests.adapters.lora_kernel_compile import compile_all

    rows = compile_all()
    assert len(rows) == 18
    assert not [row for row in rows if row["STACK"]], rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lora_kernels_on_cuda_llama_shapes_and_graph_replay():
    """Natively on the GPU: Llama-3-8B shapes (decode over 8 and 64 slots, prefill) in fp32 and bf16, and a CUDA
    graph of each kernel form captured on one slot mapping, replayed on others and after slots are rewritten."""
    pytest.importorskip("triton")
    from tests.adapters import lora_kernel_check as kc

    seed = 100
    for dtype in (torch.float32, torch.bfloat16):
        for num_tokens, in_features, out_features, num_slots, rank_max, ranks in kc.llama_cases():
            for per_token in (False, True):
                kc.check(num_tokens, in_features, out_features, num_slots, rank_max, ranks, dtype, "cuda", seed,
                         per_token)
                seed += 1
    assert kc.check_captured("cuda") == 8
