import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.http.app import build_app
from tests.helpers import app_config
from tests.server.live import LiveServer
from tests.server.test_http_errors import error_of
from tests.server.test_http_generate import upload
from tests.helpers import write_random_adapter


@pytest.fixture(scope="module")
def keyed(server_root):
    with LiveServer(build_app(app_config(server_root, api_key="user-key", admin_key="admin-key"))) as server:
        yield server


def test_api_key_and_admin_key(keyed, tmp_path):
    url = keyed.base_url
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "user-key"}):
        err = error_of(httpx.post(f"{url}/v1/generate", json={"prompt": "x"}, headers=headers), 401)
        assert "missing or invalid API key" in err["message"] and err["type"] == "authentication_error"
    user, admin = {"authorization": "Bearer user-key"}, {"authorization": "Bearer admin-key"}
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "x", "max_tokens": 1}, headers=user).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers=admin).status_code == 200
    for open_path in ("/health", "/ready", "/metrics"):
        assert httpx.get(url + open_path).status_code == 200
    folder = write_random_adapter(tmp_path / "a", keyed.state.basis, r=2)
    assert "need the admin key" in error_of(upload(url, "keyed-a", folder, headers=user), 403)["message"]
    assert upload(url, "keyed-a", folder, headers={}).status_code == 401
    assert upload(url, "keyed-a", folder, headers=admin).status_code == 201
    assert httpx.delete(f"{url}/v1/adapters/keyed-a", headers=user).status_code == 403
    assert httpx.delete(f"{url}/v1/adapters/keyed-a", headers=admin).status_code == 204


def scrape(url) -> dict:
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move(live, tmp_path):
    url = live.base_url
    before = scrape(url)
    folder = write_random_adapter(tmp_path / "m", live.state.basis, r=2, seed=5)
    assert upload(url, "metered", folder).status_code == 201
    for adapter_id in ("metered", None, "metered"):
        response = httpx.post(f"{url}/v1/generate", json={"prompt": "count me", "adapter_id": adapter_id,
                                                          "max_tokens": 4, "ignore_eos": True}, timeout=30)
        assert response.status_code == 200
    after = scrape(url)
    assert value(after, "pica_generation_tokens_total") - value(before, "pica_generation_tokens_total") == 12
    assert value(after, "pica_adapter_requests_total", adapter="metered", finish_reason="length") == 2
    assert value(after, "pica_adapter_requests_total", adapter="base", finish_reason="length") >= 1
    assert value(after, "pica_http_requests_total", endpoint="/v1/generate", status="200") >= 3
    assert value(after, "pica_time_to_first_token_seconds_count") - value(before, "pica_time_to_first_token_seconds_count") == 3
    assert value(after, "pica_inter_token_latency_seconds_count") > value(before, "pica_inter_token_latency_seconds_count")
    assert value(after, "pica_adapter_cache_misses_total", tier="host") > value(before, "pica_adapter_cache_misses_total", tier="host")
    assert value(after, "pica_adapter_cache_hits_total", tier="host") > value(before, "pica_adapter_cache_hits_total", tier="host")
    assert value(after, "pica_adapter_swap_seconds_count", path="host_to_gpu") >= 1
    assert value(after, "pica_adapters", tier="store") == len(live.state.store)
    assert value(after, "pica_ready") == 1 and value(after, "pica_model_load_seconds") > 0
    assert value(after, "pica_basis_seconds", source="computed") + value(after, "pica_basis_seconds", source="loaded") > 0
    assert value(after, "pica_kv_cache_usage_ratio") >= 0 and ("pica_batch_size_count", ()) in after


def test_openapi_docs(live):
    spec = httpx.get(live.base_url + "/openapi.json").json()
    assert {"/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters",
            "/v1/adapters/{adapter_id}", "/health", "/ready", "/metrics"} <= set(spec["paths"])
    assert httpx.get(live.base_url + "/docs").status_code == 200
