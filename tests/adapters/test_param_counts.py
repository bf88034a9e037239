"""The paper's parameter counts (PiCa, Table 2 and 3), from meta-device models of the real shapes."""

import math

import pytest
import torch

from adapters.methods.pica import PiCa
from adapters.targets import find_target_linears, group_targets

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)
GEMMA_2B = dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256)
ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def count(config_cls, shape, targets, r):
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config_cls(**shape))
    groups = group_targets(find_target_linears(model, targets), targets)
    return sum(math.prod(s) for s in PiCa().expected_tensors(r, groups).values())


@pytest.mark.parametrize("r,expected", [(32, 1_376_256), (256, 11_010_048)])
def test_llama3_8b_all_projections(r, expected):
    from transformers import LlamaConfig

    assert count(LlamaConfig, LLAMA3_8B, ALL_SEVEN, r) == expected  # r x sum(out_features)


@pytest.mark.parametrize("r,expected", [(32, 671_744), (256, 5_373_952)])
def test_gemma_2b_qkv_up_down(r, expected):
    from transformers import GemmaConfig

    assert count(GemmaConfig, GEMMA_2B, ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"), r) == expected
