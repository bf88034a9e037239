import json

import pytest
import torch

from cache.basis_cache import BasisCache
from server.model_loader import load_model
from tests.helpers import build_tiny_model


@pytest.fixture
def tiny(tmp_path, model_config_for):
    cfg = model_config_for(build_tiny_model(tmp_path / "m"), rank_max=16)
    return cfg, load_model(cfg).model


def load(cfg, model, rank_max=None):
    return BasisCache(cfg.basis_dir).load_or_compute(model, cfg.target_modules, rank_max or cfg.rank_max, progress=False)


def test_miss_then_hit(tiny):
    cfg, model = tiny
    first = load(cfg, model)
    second = load(cfg, model)
    assert (first.source, second.source) == ("computed", "loaded")
    assert first.checksum == second.checksum
    assert first.u.keys() == second.u.keys() and len(first.u) == 2 * 7
    for name in first.u:
        assert torch.equal(first.u[name], second.u[name])
    manifest = json.loads((BasisCache(cfg.basis_dir).entry_dir(first.checksum, cfg.target_modules) / "manifest.json").read_text())
    assert manifest["basis_checksum"] == first.checksum and manifest["rank_max"] == 16


def test_smaller_rank_reuses_file_larger_recomputes(tiny):
    cfg, model = tiny
    full = load(cfg, model, 16)
    small = load(cfg, model, 8)
    assert small.source == "loaded" and small.rank_max == 8
    for name, u in small.u.items():
        assert torch.equal(u, full.u[name][:, :8])
    larger = load(cfg, model, 32)
    assert larger.source == "computed"
    # columns are clipped to min(out, in) = 64 for every layer here, and the first 16 are unchanged
    for name, u in larger.u.items():
        assert u.shape[1] == 32
        torch.testing.assert_close(u[:, :16], full.u[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_damaged_cache_is_detected_and_recomputed(tiny, damage, caplog):
    cfg, model = tiny
    first = load(cfg, model)
    entry = BasisCache(cfg.basis_dir).entry_dir(first.checksum, cfg.target_modules)
    path = entry / "basis.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        (entry / "manifest.json").write_text("{not json")
    again = load(cfg, model)
    assert again.source == "computed"
    assert "unusable" in caplog.text
    for name in first.u:
        assert torch.equal(first.u[name], again.u[name])
    assert load(cfg, model).source == "loaded"  # the recomputed entry is valid again


def test_checksum_depends_on_weights_not_name(tiny):
    cfg, model = tiny
    first = load(cfg, model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    second = load(cfg, model)
    assert second.checksum != first.checksum and second.source == "computed"


def test_random_kind_has_its_own_checksum(tiny):
    cfg, model = tiny
    principal = load(cfg, model)
    rand = BasisCache(cfg.basis_dir).load_or_compute(model, cfg.target_modules, 16, kind="random:7", progress=False)
    assert rand.checksum != principal.checksum and rand.kind == "random:7"
    u = next(iter(rand.u.values()))
    torch.testing.assert_close(u.T @ u, torch.eye(16), atol=1e-5, rtol=0)


def test_checksum_does_not_depend_on_the_targets(tiny):
    cfg, model = tiny
    everything = load(cfg, model)
    q_only = BasisCache(cfg.basis_dir).load_or_compute(model, ("q_proj",), 16, progress=False)
    assert q_only.checksum == everything.checksum and set(q_only.groups) == {"q_proj"}
    assert q_only.source == "computed"  # its own cache entry
    for name, u in q_only.u.items():
        assert torch.equal(u, everything.u[name])


def test_serving_copy_in_the_model_dtype(tiny, caplog):
    cfg, model = tiny
    canonical = load(cfg, model)
    cache = BasisCache(cfg.basis_dir)
    first = cache.load_or_compute(model, cfg.target_modules, 16, progress=False, dtype=torch.bfloat16)
    entry = cache.entry_dir(canonical.checksum, cfg.target_modules)
    assert first.source == "loaded" and (entry / "basis.bfloat16.safetensors").exists()
    second = cache.load_or_compute(model, cfg.target_modules, 8, progress=False, dtype=torch.bfloat16)
    for name, u in second.u.items():
        assert u.dtype == torch.bfloat16 and torch.equal(u, canonical.u[name][:, :8].to(torch.bfloat16))
    path = entry / "basis.bfloat16.safetensors"
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF
    path.write_bytes(bytes(data))
    again = cache.load_or_compute(model, cfg.target_modules, 16, progress=False, dtype=torch.bfloat16)
    assert "basis.bfloat16.safetensors) is unusable" in caplog.text and again.source == "loaded"
    for name, u in again.u.items():
        assert torch.equal(u, canonical.u[name].to(torch.bfloat16))  # rebuilt from the float32 file
    assert cache.load_or_compute(model, cfg.target_modules, 16, progress=False).u.keys() == canonical.u.keys()
