import json
import re
import socket
import time

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
    config = app_config(server_root, api_key="user-key", admin_key="admin-key", max_body_bytes=4096)
    with LiveServer(build_app(config)) as server:
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


def raw_request(server, head: bytes) -> bytes:
    """Send request headers alone over a socket (no body follows) and return the answer's status line."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        return sock.makefile("rb").readline()


def test_the_key_is_checked_before_the_body_is_read(keyed):
    url = keyed.base_url
    bad_json = b'{"prompt": '
    response = httpx.post(f"{url}/v1/generate", content=bad_json, headers={"content-type": "application/json"})
    assert error_of(response, 401)["type"] == "authentication_error"
    # a 200 MB body that never comes: the 401 answers the headers, without waiting for (or reading) it
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 209715200\r\n\r\n")
    assert raw_request(keyed, head).startswith(b"HTTP/1.1 401")


def test_bodies_are_bounded(keyed):
    url, user = keyed.base_url, {"authorization": "Bearer user-key"}
    big = json.dumps({"prompt": "x" * 5000, "max_tokens": 1}).encode()
    err = error_of(httpx.post(f"{url}/v1/generate", content=big, headers={**user, "content-type": "application/json"}), 413)
    assert "larger than the limit of 4096 bytes" in err["message"] and err["type"] == "request_too_large"

    def chunks():  # no Content-Length: counted while it is read
        yield big[:3000]
        yield big[3000:]

    response = httpx.post(f"{url}/v1/generate", content=chunks(), headers={**user, "content-type": "application/json"})
    assert "larger than the limit of 4096 bytes" in error_of(response, 413)["message"]
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer user-key\r\n"
            b"Content-Type: application/json\r\nContent-Length: 209715200\r\n\r\n")
    assert raw_request(keyed, head).startswith(b"HTTP/1.1 413")
    small = {"prompt": "x", "max_tokens": 1}
    assert httpx.post(f"{url}/v1/generate", json=small, headers=user).status_code == 200


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
    assert 0 < value(after, "pica_adapter_pool_usage_ratio") <= 1  # the metered adapter stays resident


def test_openapi_docs(live):
    spec = httpx.get(live.base_url + "/openapi.json").json()
    paths = spec["paths"]
    assert {"/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}",
            "/v1/adapters", "/v1/adapters/{adapter_id}", "/health", "/ready", "/metrics"} <= set(paths)
    schemes = spec["components"]["securitySchemes"]
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]
    for path, method in (("/v1/generate", "post"), ("/v1/adapters", "post"), ("/v1/models", "get")):
        assert paths[path][method]["security"] == [{name: []} for name in schemes], path
    assert "security" not in paths["/health"]["get"]
    upload = paths["/v1/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(upload["required"]) == {"adapter_id", "files"} and upload["properties"]["files"]["items"]["format"] == "binary"
    for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions"):
        assert {"application/json", "text/event-stream"} <= set(paths[path]["post"]["responses"]["200"]["content"])
    assert [c.split(";")[0] for c in paths["/metrics"]["get"]["responses"]["200"]["content"]] == ["text/plain"]


def test_docs_work_offline(live):
    for page in ("/docs", "/redoc"):
        html = httpx.get(live.base_url + page)
        assert html.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html.text) + re.findall(r"url: '([^']+)'", html.text)
        assert assets, page
        for asset in assets:
            assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
            assert httpx.get(live.base_url + asset).status_code == 200, asset


def test_running_waiting_and_kv_gauges_follow_cancellations(live):
    engine = live.state.engine
    with httpx.stream("POST", f"{live.base_url}/v1/generate", timeout=60, json={
            "prompt": "keep going", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        running = scrape(live.base_url)
    assert value(running, "pica_requests_running") == 1 and value(running, "pica_kv_cache_usage_ratio") > 0
    deadline = time.monotonic() + 30  # returns as soon as the engine took the cancellation
    while engine.has_work and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_work
    after = scrape(live.base_url)
    assert value(after, "pica_requests_running") == 0 and value(after, "pica_requests_waiting") == 0
    assert value(after, "pica_kv_cache_usage_ratio") == 0
