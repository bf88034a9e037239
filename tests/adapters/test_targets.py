import pytest
from torch import nn

from adapters.targets import TargetError, find_target_linears, group_targets


class TwoShapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.ModuleDict({"q_proj": nn.Linear(16, 8), "v_proj": nn.Linear(4, 8)})
        self.b = nn.ModuleDict({"q_proj": nn.Linear(16, 12), "v_proj": nn.Linear(6, 8)})


def test_groups_share_out_features_and_may_differ_in_in_features():
    model = TwoShapes()
    groups = group_targets(find_target_linears(model, ("v_proj",)), ("v_proj",))
    assert groups["v_proj"].out_features == 8 and groups["v_proj"].in_features == (4, 6)
    assert groups["v_proj"].max_rank == 4


def test_a_suffix_with_several_out_features_is_refused():
    model = TwoShapes()
    with pytest.raises(TargetError, match=r"group 'q_proj' has layers with different out_features \[8, 12\]"):
        group_targets(find_target_linears(model, ("q_proj", "v_proj")), ("q_proj", "v_proj"))
    with pytest.raises(TargetError, match="no nn.Linear in the model matches target modules"):
        find_target_linears(model, ("gate_proj",))
