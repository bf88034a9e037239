"""Adapters provisioned from disk at start are served; a damaged store entry fails only its own id."""

import httpx
import pytest

from cache.basis_cache import BasisCache
from server.http.app import build_app
from server.model_loader import load_model
from tests.helpers import app_config, build_tiny_model, write_random_adapter
from tests.server.live import LiveServer
from tests.server.test_http_errors import error_of


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("store-srv")
    build_tiny_model(root / "model", "llama", seed=3)
    config = app_config(root)
    basis = BasisCache(config.model.basis_dir).load_or_compute(
        load_model(config.model).model, config.model.target_modules, config.model.rank_max, progress=False)
    store = root / "adapters"
    write_random_adapter(root / "src" / "disk", basis, r=4, seed=1)
    write_random_adapter(store / "copied", basis, r=4, seed=2)  # copied into the store by hand
    damaged = write_random_adapter(store / "damaged", basis, r=4, seed=3)
    (damaged / "meta.json").write_text("{not json")
    config = app_config(root, adapters=(("from-disk", root / "src" / "disk"), ("missing", root / "nowhere")))
    with LiveServer(build_app(config)) as live:
        yield live


def generate(server, adapter_id):
    return httpx.post(f"{server.base_url}/v1/generate", json={"prompt": "hi", "adapter_id": adapter_id, "max_tokens": 2},
                      timeout=30)


def damaged_count(server) -> float:
    line = next(l for l in httpx.get(f"{server.base_url}/metrics").text.splitlines()
                if l.startswith("pica_store_damaged_adapters "))
    return float(line.split()[1])


def test_adapters_from_disk_are_served_and_damaged_ones_skipped(server):
    listed = [a["id"] for a in httpx.get(f"{server.base_url}/v1/adapters").json()["data"]]
    assert listed == ["copied", "from-disk"]
    models = [m["id"] for m in httpx.get(f"{server.base_url}/v1/models").json()["data"]]
    assert models[1:] == ["copied", "from-disk"]
    assert generate(server, "from-disk").status_code == 200 and generate(server, "copied").status_code == 200
    err = error_of(httpx.get(f"{server.base_url}/v1/adapters/damaged"), 500)
    assert "'damaged' is damaged in the store" in err["message"] and "delete it" in err["message"]
    assert "is damaged in the store" in error_of(generate(server, "damaged"), 500)["message"]
    error_of(generate(server, "missing"), 404)  # its --adapter was logged and skipped
    assert damaged_count(server) == 1


def test_a_truncated_weights_file_fails_its_own_id_only(server):
    upload = httpx.post(f"{server.base_url}/v1/adapters", data={"adapter_id": "fresh"}, timeout=30, files=[
        ("files", (name, (server.state.store.root / "copied" / name).read_bytes()))
        for name in ("adapter_config.json", "adapter_model.safetensors")])
    assert upload.status_code == 201, upload.text
    weights = server.state.store.root / "fresh" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    assert "not a readable safetensors file" in error_of(generate(server, "fresh"), 500)["message"]
    assert [a["id"] for a in httpx.get(f"{server.base_url}/v1/adapters").json()["data"]] == ["copied", "from-disk"]
    assert generate(server, "from-disk").status_code == 200
    assert damaged_count(server) == 2
    assert httpx.delete(f"{server.base_url}/v1/adapters/fresh").status_code == 204
    assert damaged_count(server) == 1
