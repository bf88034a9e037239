import json

import pytest
import torch

from adapters.targets import find_target_linears
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
    assert first.p.keys() == second.p.keys() and len(first.p) == 2 * 7
    for name in first.p:
        assert torch.equal(first.p[name], second.p[name])
    manifest = json.loads((BasisCache(cfg.basis_dir).entry_dir(first.checksum, cfg.target_modules) / "manifest.json").read_text())
    assert manifest["basis_checksum"] == first.checksum and manifest["rank_max"] == 16


def test_smaller_rank_reuses_file_larger_recomputes(tiny):
    cfg, model = tiny
    full = load(cfg, model, 16)
    small = load(cfg, model, 8)
    assert small.source == "loaded" and small.rank_max == 8
    for name, u in small.p.items():
        assert torch.equal(u, full.p[name][:8])
    larger = load(cfg, model, 32)
    assert larger.source == "computed"
    # rows are clipped to min(out, in) = 64 for every layer here, and the first 16 are unchanged
    for name, u in larger.p.items():
        assert u.shape[0] == 32
        torch.testing.assert_close(u[:16], full.p[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "tensors-dir", "manifest-dir"])
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
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{not json")
    else:  # a folder where a file should be: start-up must rebuild, not fail with EISDIR forever
        target = entry / ("basis.safetensors" if damage == "tensors-dir" else "manifest.json")
        target.unlink()
        (target / "x").mkdir(parents=True)
    again = load(cfg, model)
    assert again.source == "computed"
    assert "unusable" in caplog.text
    for name in first.p:
        assert torch.equal(first.p[name], again.p[name])
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
    u = next(iter(rand.p.values()))
    torch.testing.assert_close(u @ u.T, torch.eye(16), atol=1e-5, rtol=0)


def test_checksum_does_not_depend_on_the_targets(tiny):
    cfg, model = tiny
    everything = load(cfg, model)
    q_only = BasisCache(cfg.basis_dir).load_or_compute(model, ("q_proj",), 16, progress=False)
    assert q_only.checksum == everything.checksum and set(q_only.groups) == {"q_proj"}
    assert q_only.source == "computed"  # its own cache entry
    for name, u in q_only.p.items():
        assert torch.equal(u, everything.p[name])


def test_serving_copy_in_the_model_dtype(tiny, caplog):
    cfg, model = tiny
    canonical = load(cfg, model)
    cache = BasisCache(cfg.basis_dir)
    first = cache.load_or_compute(model, cfg.target_modules, 16, progress=False, dtype=torch.bfloat16)
    entry = cache.entry_dir(canonical.checksum, cfg.target_modules)
    assert first.source == "loaded" and (entry / "basis.bfloat16.safetensors").exists()
    second = cache.load_or_compute(model, cfg.target_modules, 8, progress=False, dtype=torch.bfloat16)
    for name, u in second.p.items():
        assert u.dtype == torch.bfloat16 and torch.equal(u, canonical.p[name][:8].to(torch.bfloat16))
    path = entry / "basis.bfloat16.safetensors"
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF
    path.write_bytes(bytes(data))
    again = cache.load_or_compute(model, cfg.target_modules, 16, progress=False, dtype=torch.bfloat16)
    assert "basis.bfloat16.safetensors) is unusable" in caplog.text and again.source == "loaded"
    for name, u in again.p.items():
        assert torch.equal(u, canonical.p[name].to(torch.bfloat16))  # rebuilt from the float32 file
    assert cache.load_or_compute(model, cfg.target_modules, 16, progress=False).p.keys() == canonical.p.keys()


def test_holds_right_singular_vectors_and_ignores_an_older_format(tiny):
    cfg, model = tiny
    basis = load(cfg, model)
    for name, linear in find_target_linears(model, cfg.target_modules).items():
        p = basis.p[name]
        assert p.shape == (16, linear.in_features)
        vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False).Vh[:16]
        torch.testing.assert_close((p.double() @ vh.T).abs(), torch.eye(16, dtype=torch.float64), atol=1e-4, rtol=0)
    # an entry of format 2 (which held U) under the same key is never read as P
    entry = BasisCache(cfg.basis_dir).entry_dir(basis.checksum, cfg.target_modules)
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))
    assert load(cfg, model).source == "computed"
