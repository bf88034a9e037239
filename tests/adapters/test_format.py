import json
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from adapters.format import (
    AdapterExpectation,
    AdapterValidationError,
    load_adapter_dir,
    parse_adapter,
)
from adapters.targets import GroupInfo

GROUPS = {
    "q_proj": GroupInfo("q_proj", 64, ("l.0.q_proj", "l.1.q_proj"), (64, 64)),
    "down_proj": GroupInfo("down_proj", 48, ("l.0.down_proj", "l.1.down_proj"), (96, 96)),
}
EXPECT = AdapterExpectation(GROUPS, {"q_proj": 16, "down_proj": 16}, basis_checksum="a" * 64)


def config(**kw):
    base = {"method": "pica", "r": 8, "target_modules": ["q_proj", "down_proj"], "basis_checksum": "a" * 64}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def weights(**tensors):
    base = {"M.q_proj": torch.randn(64, 8), "M.down_proj": torch.randn(48, 8)}
    base.update(tensors)
    return st_save({k: v for k, v in base.items() if v is not None})


def problems(cfg=None, w=None):
    with pytest.raises(AdapterValidationError) as info:
        parse_adapter(cfg or config(), w or weights(), EXPECT)
    return " | ".join(info.value.problems)


def test_per_layer_signs_are_optional():
    adapter = parse_adapter(config(), weights(**{"signs.q_proj": -torch.ones(2, 8)}), EXPECT)
    assert set(adapter.slot_tensors()) == {"q_proj", "down_proj", "signs.q_proj"}


def test_valid_adapter_loads():
    adapter = parse_adapter(config(), weights(), EXPECT)
    assert adapter.config.r == 8 and adapter.num_params == 8 * (64 + 48)  # r x sum of out_features
    assert set(adapter.slot_tensors()) == {"q_proj", "down_proj"}
    assert len(adapter.checksum) == 64


@pytest.mark.parametrize(
    "cfg,message",
    [
        (b"{oops", "is not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (config(method="lora-xl"), "unknown method 'lora-xl'; this server knows ['lora', 'pica', 'psoft']"),
        (config(r=0), "r must be a positive integer, got 0"),
        (config(r="8"), "r must be a positive integer, got '8'"),
        (config(target_modules="q_proj"), "target_modules must be a non-empty list of strings"),
        (config(target_modules=["q_proj", "lm_head"]), "target_modules ['lm_head'] are not target groups of this base model"),
        (config(r=17), "r=17 exceeds the basis rank 16 available for group 'down_proj'"),
        (config(basis_checksum="b" * 64), "adapter was trained against basis bbbbbbbbbbbbbbbb"),
        (config(basis_kind="random:1"), "adapter uses a 'random:1' basis, this server serves the 'principal' basis"),
        (config(format_version=1), "format_version 1 is not served; this server reads format 2"),
    ],
)
def test_config_problems(cfg, message):
    assert message in problems(cfg=cfg)


@pytest.mark.parametrize(
    "w,message",
    [
        (b"\x00\x01garbage", "adapter_model.safetensors is not a readable safetensors file"),
        (weights()[:-10], "adapter_model.safetensors is not a readable safetensors file"),
        (weights(**{"M.q_proj": None}), "missing tensors ['M.q_proj']"),
        (weights(**{"M.v_proj": torch.zeros(64, 8)}), "unexpected tensors ['M.v_proj']"),
        (weights(**{"M.q_proj": torch.zeros(65, 8)}), "tensor M.q_proj has shape [65, 8], expected [64, 8]"),
        (weights(**{"M.q_proj": torch.zeros(8, 64)}), "tensor M.q_proj has shape [8, 64], expected [64, 8]"),
        (weights(**{"M.q_proj": torch.zeros(64, 8, dtype=torch.int32)}), "tensor M.q_proj has dtype torch.int32"),
        (weights(**{"M.q_proj": torch.full((64, 8), float("nan"))}), "tensor M.q_proj has non-finite values"),
        (weights(**{"M.down_proj": torch.full((48, 8), float("inf"))}), "tensor M.down_proj has non-finite values"),
        (weights(**{"signs.q_proj": torch.ones(3, 8)}), "tensor signs.q_proj has shape [3, 8], expected [2, 8]"),
        (weights(**{"signs.q_proj": torch.full((2, 8), 0.5)}), "tensor signs.q_proj must hold only +1 and -1"),
        (weights(**{"signs.v_proj": torch.ones(2, 8)}), "unexpected tensors ['signs.v_proj']"),
    ],
)
def test_weight_problems(w, message):
    assert message in problems(w=w)


def test_all_problems_reported_at_once():
    text = problems(cfg=config(r=0, method="x"), w=b"junk")
    assert "unknown method 'x'" in text and "r must be a positive integer" in text and "not a readable safetensors" in text


def test_unknown_keys_warn_but_load(caplog):
    adapter = parse_adapter(config(peft_type="PICA", alpha=3), weights(), EXPECT)
    assert adapter.warnings == ("adapter_config.json: ignoring unknown keys ['alpha', 'peft_type']",)
    assert "ignoring unknown keys" in caplog.text


def test_missing_files(tmp_path):
    with pytest.raises(AdapterValidationError, match="missing adapter_config.json") as info:
        load_adapter_dir(tmp_path, EXPECT)
    assert len(info.value.problems) == 2


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/pica-unpickled-marker",))


def test_pickle_is_never_unpickled(tmp_path):
    import os

    marker = "/tmp/pica-unpickled-marker"
    if os.path.exists(marker):
        os.remove(marker)
    payload = pickle.dumps({"M.q_proj": _Boom()})
    assert "not a readable safetensors file" in problems(w=payload)
    assert not os.path.exists(marker)


def test_an_adapter_of_the_old_transposed_format_gets_a_clear_message():
    old = st_save({"B.q_proj": torch.randn(8, 64), "B.down_proj": torch.randn(8, 96)})
    text = problems(w=old)
    assert "transposed PiCa of adapter format 1" in text and "M.<group> [out_features, r]" in text
    assert "missing tensors" not in text and "shape" not in text.replace("[out_features, r]", "")


def test_non_finite_names_exactly_the_tensors_with_nan_or_inf():
    from adapters.format import non_finite

    clean = {"a": torch.randn(4, 3), "b": torch.randn(5).bfloat16(), "empty": torch.zeros(0, 2)}
    assert non_finite(clean) == [] and non_finite({}) == []
    one_bad = torch.randn(6).half()
    one_bad[3] = float("-inf")
    nan_bf16 = torch.randn(2, 2).bfloat16()
    nan_bf16[1, 0] = float("nan")
    assert non_finite({**clean, "c": one_bad, "d": nan_bf16}) == ["c", "d"]
