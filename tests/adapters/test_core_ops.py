"""The core op between frozen factors (PSOFT's y += E K[slot] z): each version against the plain-torch loop on random
slot mappings (base tokens, repeated slots, slots of other methods with no core), and on CUDA inside a captured
graph replayed with other mappings."""

import pytest
import torch

from tests.adapters.core_ops_check import check, check_captured


@pytest.mark.parametrize("fn", ["torch", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(1, 2, 4, 16), (9, 4, 8, 48), (40, 6, 8, 24)])
def test_core_ops_match_reference(fn, dtype, case):
    num_tokens, num_slots, rank_max, out = case
    check(num_tokens, num_slots, rank_max, out, dtype, "cpu", seed=sum(case), fn=fn)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_core_op_matches_reference(dtype):
    for seed, case in enumerate([(1, 2, 4, 16), (64, 16, 16, 256), (300, 8, 32, 96)]):
        check(*case, dtype, "cuda", seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_core_op_in_a_graph_replays_with_other_slot_mappings():
    check_captured("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_core_op_of_a_prefill_sized_step_matches_reference():
    from adapters.core_ops import GATHERED_MAX_TOKENS

    check(GATHERED_MAX_TOKENS + 77, 8, 16, 64, torch.bfloat16, "cuda", seed=5)  # the per-slot path on CUDA
