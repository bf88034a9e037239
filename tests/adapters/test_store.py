"""The store keeps serving around a damaged entry, adopts folders copied into it, and provisions from disk."""

import json
import logging
import shutil

import pytest

from adapters.format import AdapterExpectation, AdapterValidationError
from adapters.store import AdapterIdError, AdapterStore, DamagedAdapterError, check_adapter_id
from cache.basis_cache import BasisCache
from server.model_loader import load_model
from tests.helpers import build_tiny_model, write_random_adapter


@pytest.fixture(scope="module")
def basis(tmp_path_factory):
    from server.config import ModelConfig

    root = tmp_path_factory.mktemp("store")
    cfg = ModelConfig(model=str(build_tiny_model(root / "m")), device="cpu", rank_max=8, cache_dir=root / "c")
    return BasisCache(cfg.basis_dir).load_or_compute(load_model(cfg).model, cfg.target_modules, 8, progress=False)


def folder_of(tmp_path, basis, name, seed=0):
    return write_random_adapter(tmp_path / "src" / name, basis, r=4, seed=seed)


def filled_store(tmp_path, basis, ids=("a", "b", "c")) -> AdapterStore:
    store = AdapterStore(tmp_path / "store", AdapterExpectation.from_basis(basis))
    for i, adapter_id in enumerate(ids):
        store.provision(adapter_id, folder_of(tmp_path, basis, adapter_id, seed=i))
    return store


@pytest.mark.parametrize("adapter_id", ["abc\n", ".upload-x", ".hidden", ".", "..", "a/b", "x" * 129, ""])
def test_bad_ids(adapter_id):
    with pytest.raises(AdapterIdError):
        check_adapter_id(adapter_id)


@pytest.mark.parametrize("restart", [False, True])
def test_a_damaged_meta_json_is_skipped_and_reported(tmp_path, basis, restart, caplog):
    store = filled_store(tmp_path, basis)
    (store.root / "b" / "meta.json").write_text("{not json")
    if restart:
        store = AdapterStore(store.root, store.expect)
    with pytest.raises(DamagedAdapterError, match="'b' is damaged in the store"):
        store.info("b")
    assert store.ids() == ["a", "c"] and len(store) == 2 and "b" in store.damaged
    assert store.info("a").id == "a" and store.load("c").config.r == 4
    assert "adapter 'b' is damaged" in caplog.text
    store.delete("b")  # a damaged entry can be deleted, then uploaded again
    assert not store.damaged
    store.provision("b", folder_of(tmp_path, basis, "b", seed=1))
    assert store.ids() == ["a", "b", "c"]


def test_a_truncated_weights_file_is_damaged(tmp_path, basis):
    store = filled_store(tmp_path, basis)
    weights = store.root / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DamagedAdapterError, match="not a readable safetensors file"):
        store.load("a")
    assert store.ids() == ["b", "c"]
    restarted = AdapterStore(store.root, store.expect)
    assert "has 100 bytes" in restarted.damaged["a"] and restarted.ids() == ["b", "c"]


def test_folders_copied_into_the_store_are_adopted_at_start(tmp_path, basis, caplog):
    store = filled_store(tmp_path, basis, ids=("a",))
    shutil.copytree(folder_of(tmp_path, basis, "copied", seed=7), store.root / "copied")
    bad = shutil.copytree(folder_of(tmp_path, basis, "bad", seed=8), store.root / "bad")
    (bad / "adapter_config.json").write_text(json.dumps({"method": "pica", "r": 4, "target_modules": ["nope"]}))
    shutil.copytree(folder_of(tmp_path, basis, "x", seed=9), store.root / "sp ace")
    with caplog.at_level(logging.INFO):
        restarted = AdapterStore(store.root, store.expect)
    assert restarted.ids() == ["a", "copied"]
    assert restarted.load("copied").config.r == 4 and restarted.info("copied").num_params > 0
    assert "not target groups of this base model" in restarted.damaged["bad"]
    assert (store.root / "bad" / "adapter_config.json").exists()  # skipped, never deleted
    assert "ignoring folder" in caplog.text and "adopted adapter folder" in caplog.text


def test_provision_keeps_the_same_weights_and_replaces_others(tmp_path, basis):
    store = filled_store(tmp_path, basis, ids=("a",))
    before = store.info("a")
    assert store.provision("a", folder_of(tmp_path, basis, "a", seed=0)) == before
    other = write_random_adapter(tmp_path / "other", basis, r=2, seed=3)
    assert store.provision("a", other).r == 2
    with pytest.raises(AdapterValidationError, match="missing adapter_config.json"):
        store.provision("b", tmp_path / "nowhere")
    assert store.ids() == ["a"]


def test_replicas_sharing_one_store_see_each_others_uploads_and_deletes(tmp_path, basis):
    import os
    import time

    import torch

    from cache.host_cache import HostCache

    expect = AdapterExpectation.from_basis(basis)
    a = AdapterStore(tmp_path / "store", expect)
    b = AdapterStore(tmp_path / "store", expect)  # another replica's store on the same folder
    host_b = HostCache(b.load, 4, torch.float32, pin_memory=False)
    a.provision("x", folder_of(tmp_path, basis, "x", seed=1))
    assert "x" in b and b.ids() == ["x"]
    first = host_b.get("x", b.info("x").checksum)
    a.delete("x")
    with pytest.raises(KeyError):
        b.info("x")  # what resolve_adapter asks first: a 404 on every replica at once
    a.provision("x", folder_of(tmp_path, basis, "x2", seed=2))  # the same id, other weights
    again = host_b.get("x", b.info("x").checksum)
    assert again.version != first.version and not torch.equal(again.tensors["q_proj"], first.tensors["q_proj"])
    with pytest.raises(FileExistsError):
        b.put("x", (a.root / "x" / "adapter_config.json").read_bytes(), (a.root / "x" / "adapter_model.safetensors").read_bytes())
    # a replica starting beside one that is mid-upload leaves its temp folder alone; a crash's old one goes
    fresh, stale = a.root / ".upload-fresh", a.root / ".deleted-stale"
    fresh.mkdir()
    stale.mkdir()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    AdapterStore(tmp_path / "store", expect)
    assert fresh.exists() and not stale.exists()
