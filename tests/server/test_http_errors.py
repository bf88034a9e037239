"""Every bad input gets the right 4xx with the JSON error schema, and the server keeps serving."""

import io
import json
import threading
import zipfile

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

import server.http.app as app_module
from server.http.app import build_app
from tests.helpers import app_config, random_adapter_tensors, tar_gz
from tests.server.live import LiveServer


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}
    return body["error"]


def post_files(live, adapter_id, files: dict, **kw):
    parts = [("files", (name, data)) for name, data in files.items()]
    data = {} if adapter_id is None else {"adapter_id": adapter_id}
    return httpx.post(f"{live.base_url}/v1/adapters", data=data, files=parts, timeout=30, **kw)


def zip_bytes(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_archives_upload(live, good_files):
    nested = {f"my-adapter/{k}": v for k, v in good_files.items()}
    response = post_files(live, "from-tar", {"a.tar.gz": tar_gz(nested)})
    assert response.status_code == 201, response.text
    response = post_files(live, "from-zip", {"a.zip": zip_bytes(good_files)})
    assert response.status_code == 201, response.text
    assert httpx.post(f"{live.base_url}/v1/generate", json={"prompt": "hi", "adapter_id": "from-zip", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("adapter_id,message", [
    ("bad/id", "invalid adapter id 'bad/id'"),
    ("..", "invalid adapter id '..'"),
    ("x" * 129, "invalid adapter id"),
    ("sp ace", "invalid adapter id 'sp ace'"),
])
def test_upload_bad_ids(live, good_files, adapter_id, message):
    err = error_of(post_files(live, adapter_id, good_files), 400)
    assert message in err["message"] and err["param"] == "adapter_id"


def test_upload_problems(live, good_files):
    assert post_files(live, "dup", good_files).status_code == 201
    err = error_of(post_files(live, "dup", good_files), 409)
    assert "already exists" in err["message"]
    assert "missing form field adapter_id" in error_of(post_files(live, None, good_files), 400)["message"]
    only_config = {"adapter_config.json": good_files["adapter_config.json"]}
    assert "upload lacks ['adapter_model.safetensors']" in error_of(post_files(live, "half", only_config), 400)["message"]
    base_name = live.state.model_name
    assert "is the base model's name" in error_of(post_files(live, base_name, good_files), 400)["message"]
    response = httpx.post(f"{live.base_url}/v1/adapters", json={"adapter_id": "x"})
    assert "multipart/form-data" in error_of(response, 400)["message"]


def test_upload_invalid_adapter_reports_every_problem(live, good_files):
    basis = live.state.basis
    config = {"method": "pica", "r": 4, "target_modules": ["q_proj", "nope_proj"], "basis_checksum": "f" * 64}
    tensors = random_adapter_tensors(basis, 4, ["q_proj"])
    tensors["M.q_proj"] = torch.full_like(tensors["M.q_proj"], float("nan"))
    err = error_of(post_files(live, "broken", {"adapter_config.json": json.dumps(config).encode(),
                                               "adapter_model.safetensors": st_save(tensors)}), 400)
    assert "target_modules ['nope_proj'] are not target groups of this base model" in err["message"]
    assert "adapter was trained against basis ffffffffffffffff" in err["message"]
    err = error_of(post_files(live, "broken", {**good_files, "adapter_model.safetensors": b"\x80\x04pickle"}), 400)
    assert "not a readable safetensors file" in err["message"]
    wrong_shape = random_adapter_tensors(basis, 5)
    err = error_of(post_files(live, "broken", {**good_files, "adapter_model.safetensors": st_save(wrong_shape)}), 400)
    assert "tensor M.q_proj has shape [64, 5], expected [64, 4]" in err["message"]
    assert "broken" not in live.state.store


def with_server_limits(live, monkeypatch, **limits):
    cfg = live.state.config
    server = cfg.server.__class__(**{**cfg.server.__dict__, **limits})
    monkeypatch.setattr(live.state, "config", cfg.__class__(cfg.model, cfg.engine, server))


def test_upload_size_and_archive_limits(live, good_files, monkeypatch):
    traversal = tar_gz({"../../etc/adapter_config.json": b"{}", "adapter_model.safetensors": b""})
    assert "unsafe path" in error_of(post_files(live, "evil", {"a.tar.gz": traversal}), 400)["message"]
    linked = tar_gz(good_files, symlink="adapter_extra")
    assert "is a link or special file" in error_of(post_files(live, "evil", {"a.tar.gz": linked}), 400)["message"]
    assert "not a readable tar archive" in error_of(post_files(live, "evil", {"a.tar.gz": b"nope"}), 400)["message"]
    with_server_limits(live, monkeypatch, max_unpacked_bytes=100)
    err = error_of(post_files(live, "bomb", {"a.zip": zip_bytes(good_files)}), 413)
    assert "unpacks to more than 100 bytes" in err["message"]
    with_server_limits(live, monkeypatch, max_upload_bytes=1000)
    err = error_of(post_files(live, "big", good_files), 413)
    assert "larger than the limit of 1000 bytes" in err["message"]
    assert "big" not in live.state.store and "bomb" not in live.state.store


@pytest.mark.parametrize("payload,status,message", [
    ({"prompt": "hi", "adapter_id": "missing"}, 404, "model or adapter 'missing' not found"),
    ({"prompt": "hi", "temperature": -1}, 422, "temperature: Input should be greater than or equal to 0"),
    ({"prompt": "hi", "bogus": 1}, 422, "bogus: Extra inputs are not permitted"),
    ({"prompt": ""}, 422, "prompt: String should have at least 1 character"),
    ({"prompt": "hi", "max_tokens": 0}, 422, "max_tokens: Input should be greater than or equal to 1"),
    ({"prompt": "x" * 300, "max_tokens": 4}, 400, "more than this model's context length 256"),
    ({"prompt": "hi", "stop": ["a"] * 9}, 400, "at most 8 stop strings"),
    ({"prompt": "hi", "seed": 2**64}, 422, "seed: Input should be less than or equal to 18446744073709551615"),
    ({"prompt": "hi", "seed": -(2**63) - 1}, 422, "seed: Input should be greater than or equal to"),
])
def test_generate_bad_input(live, payload, status, message):
    err = error_of(httpx.post(f"{live.base_url}/v1/generate", json=payload, timeout=30), status)
    assert message in err["message"]


@pytest.mark.parametrize("path,payload,status,message", [
    ("/v1/completions", {"model": "ghost", "prompt": "x"}, 404, "'ghost' not found"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
    ("/v1/completions", {"model": "BASE", "prompt": "x", "echo": True}, 400, "echo is not supported"),
    ("/v1/completions", {"model": "BASE"}, 422, "prompt: Field required"),
    ("/v1/chat/completions", {"model": "BASE", "messages": []}, 422, "messages: List should have at least 1 item"),
    ("/v1/chat/completions", {"model": "BASE", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "only text content parts are supported"),
    ("/v1/chat/completions", {"model": "BASE", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
     400, "tools are not supported"),
])
def test_openai_bad_input(live, path, payload, status, message):
    if payload.get("model") == "BASE":
        payload = {**payload, "model": live.state.model_name}
    err = error_of(httpx.post(live.base_url + path, json=payload, timeout=30), status)
    assert message in err["message"]


def test_invalid_json_is_a_400_in_words(live):
    for path in ("/v1/generate", "/v1/chat/completions"):
        response = httpx.post(live.base_url + path, content=b'{"prompt": "hi",}', headers={"content-type": "application/json"})
        err = error_of(response, 400)
        assert err["type"] == "invalid_request_error"
        assert err["message"].startswith("the request body is not valid JSON: ") and "at character 16" in err["message"]


@pytest.mark.parametrize("path,extra", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("/v1/completions", {"prompt": "x"}),
])
def test_response_format_is_refused_unless_text(live, path, extra):
    payload = {"model": live.state.model_name, "max_tokens": 2, **extra}
    for kind in ("json_object", "json_schema"):
        err = error_of(httpx.post(live.base_url + path, json={**payload, "response_format": {"type": kind}}), 400)
        assert f"response_format '{kind}' is not supported" in err["message"] and err["param"] == "response_format"
    assert httpx.post(live.base_url + path, json={**payload, "response_format": {"type": "text"}}).status_code == 200


def test_errors_do_not_echo_huge_input(live, good_files):
    huge = "q" * 10_000_000
    config = {"method": "pica", "r": 4, "target_modules": huge}
    err = error_of(post_files(live, "huge", {**good_files, "adapter_config.json": json.dumps(config).encode()}), 400)
    assert "target_modules must be a non-empty list of strings" in err["message"]
    assert len(err["message"]) < 3000 and "more characters" in err["message"]
    err = error_of(httpx.post(f"{live.base_url}/v1/generate", json={"prompt": "hi", "x" * 100_000: 1}), 422)
    assert len(err["message"]) < 3000 and len(err["param"]) < 300
    err = error_of(httpx.post(f"{live.base_url}/v1/completions", json={"model": "m" * 100_000, "prompt": "x"}), 404)
    assert len(err["message"]) < 3000
def test_a_bad_seed_fails_only_its_own_request(live):
    """Seeds torch refuses used to fail the engine step, and with it every request in flight."""
    base = live.state.model_name
    payload = {"model": base, "prompt": "hi", "max_tokens": 30, "ignore_eos": True, "temperature": 1.0}
    results = {}

    def run(i):
        results[i] = httpx.post(f"{live.base_url}/v1/completions", json={**payload, "seed": i}, timeout=60)

    others = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in others:
        thread.start()
    err = error_of(httpx.post(f"{live.base_url}/v1/completions", json={**payload, "seed": 2**64 - 1, "n": 2}), 400)
    assert "seed must be in" in err["message"]  # choice 1 would use seed + 1
    error_of(httpx.post(f"{live.base_url}/v1/completions", json={**payload, "seed": 2**64}), 422)
    for thread in others:
        thread.join(60)
    assert [results[i].status_code for i in range(4)] == [200] * 4
    assert all(results[i].json()["usage"]["completion_tokens"] == 30 for i in range(4))


def test_queue_full_is_429(live, monkeypatch):
    monkeypatch.setattr(live.state.async_engine, "max_num_requests", 0)
    err = error_of(httpx.post(f"{live.base_url}/v1/generate", json={"prompt": "hi"}), 429)
    assert "the server is full" in err["message"] and err["type"] == "rate_limit_error"


def test_unknown_route_and_method(live):
    assert "Not Found" in error_of(httpx.get(f"{live.base_url}/v1/nothing"), 404)["message"]
    error_of(httpx.get(f"{live.base_url}/v1/generate"), 405)


def test_server_still_serves_after_bad_input(live):
    response = httpx.post(f"{live.base_url}/v1/generate", json={"prompt": "still here", "max_tokens": 3, "ignore_eos": True},
                          timeout=30)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


def test_503_until_ready(server_root, monkeypatch):
    release = threading.Event()
    real = app_module.build_state

    def slow_build(config, metrics):
        release.wait(30)
        return real(config, metrics)

    monkeypatch.setattr(app_module, "build_state", slow_build)
    server = LiveServer(build_app(app_config(server_root))).start()
    try:
        assert httpx.get(server.base_url + "/health").status_code == 200
        assert "still loading" in error_of(httpx.get(server.base_url + "/ready"), 503)["message"]
        assert "still loading" in error_of(httpx.post(server.base_url + "/v1/generate", json={"prompt": "x"}), 503)["message"]
    finally:
        release.set()
        server.wait_ready()
        server.__exit__(None, None, None)
