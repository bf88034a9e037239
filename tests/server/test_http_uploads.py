"""Hostile uploads get a clear 4xx and cannot stall the server; an error never costs the connection."""

import json
import socket
import threading

import httpx
import pytest

import server.http.routes.adapters as adapter_routes
from tests.adapters.test_archive import damaged_zips
from tests.helpers import tar_gz
from tests.server.test_http_errors import error_of, post_files


def config_bytes(live, **fields) -> bytes:
    basis = live.state.basis
    return json.dumps({"method": "pica", "r": 4, "target_modules": sorted(basis.groups), **fields}).encode()


def test_configs_that_break_the_json_parser_are_400(live, good_files):
    digits = b'{"method": "pica", "r": ' + b"1" * 5000 + b', "target_modules": ["q_proj"]}'
    err = error_of(post_files(live, "digits", {**good_files, "adapter_config.json": digits}), 400)
    assert "adapter_config.json is not valid JSON" in err["message"]
    nested = b"[" * 100_000 + b"]" * 100_000
    err = error_of(post_files(live, "nested", {**good_files, "adapter_config.json": nested}), 400)
    assert "nests too deeply" in err["message"]


@pytest.mark.parametrize("case", ["bad crc", "corrupt deflate", "inflates past its size"])
def test_damaged_zips_are_400(live, case):
    err = error_of(post_files(live, "damaged", {"a.zip": damaged_zips()[case]}), 400)
    assert "not a readable zip archive" in err["message"]


def test_truncated_tar_gz_is_400(live, good_files):
    data = tar_gz(good_files)
    err = error_of(post_files(live, "truncated", {"a.tar.gz": data[: len(data) // 2]}), 400)
    assert "not a readable tar archive" in err["message"]


def test_weights_larger_than_any_servable_adapter_are_413(live, good_files):
    big = bytes(live.state.store.expect.max_weights_bytes + 1)
    err = error_of(post_files(live, "huge", {**good_files, "adapter_model.safetensors": big}), 413)
    assert "more than this server accepts" in err["message"]
    err = error_of(post_files(live, "huge", {"a.tar.gz": tar_gz({**good_files, "adapter_model.safetensors": big})}), 413)
    assert "more than this server accepts" in err["message"]


def test_duplicated_target_modules_are_refused(live, good_files):
    config = config_bytes(live, target_modules=["q_proj", "q_proj"])
    err = error_of(post_files(live, "twice", {**good_files, "adapter_config.json": config}), 400)
    assert "target_modules lists ['q_proj'] more than once" in err["message"]


def test_two_config_parts_are_refused(live, good_files):
    parts = [("files", ("adapter_config.json", good_files["adapter_config.json"])),
             ("files", ("adapter_config.json", config_bytes(live, r=2))),
             ("files", ("adapter_model.safetensors", good_files["adapter_model.safetensors"]))]
    response = httpx.post(f"{live.base_url}/v1/adapters", data={"adapter_id": "two-configs"}, files=parts, timeout=30)
    assert "adapter_config.json more than once" in error_of(response, 400)["message"]
    assert "two-configs" not in live.state.store


def test_archive_with_the_files_in_two_folders_is_refused(live, good_files):
    members = {"a/adapter_config.json": good_files["adapter_config.json"],
               "b/adapter_model.safetensors": good_files["adapter_model.safetensors"]}
    assert "several folders" in error_of(post_files(live, "split", {"a.tar.gz": tar_gz(members)}), 400)["message"]


@pytest.mark.parametrize("adapter_id", ["abc\n", ".upload-x", ".hidden", ".deleted-y"])
def test_ids_in_the_stores_name_space_or_with_a_newline_are_refused(live, good_files, adapter_id):
    err = error_of(post_files(live, adapter_id, good_files), 400)
    assert "invalid adapter id" in err["message"] and err["param"] == "adapter_id"
    assert not any(p.name.startswith((".upload-x", ".hidden", "abc")) for p in live.state.store.root.iterdir())


def test_unpacking_does_not_block_liveness(live, good_files, monkeypatch):
    """An archive that takes long to unpack (here: held until /health has answered) runs off the event loop."""
    entered, release = threading.Event(), threading.Event()
    real = adapter_routes.unpack_adapter_archive

    def slow_unpack(*args):
        entered.set()
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(adapter_routes, "unpack_adapter_archive", slow_unpack)
    result = {}
    upload = threading.Thread(target=lambda: result.update(
        response=post_files(live, "slow", {"a.tar.gz": tar_gz(good_files)})))
    upload.start()
    try:
        assert entered.wait(30)
        assert httpx.get(f"{live.base_url}/health", timeout=10).status_code == 200
    finally:
        release.set()
        upload.join(60)
    assert result["response"].status_code == 201, result["response"].text


def http_exchange(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on a kept-alive socket and read its whole response (Content-Length)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        body += chunk
    return int(head.split()[1]), body


def test_a_500_keeps_the_connection_open(live, monkeypatch):
    def broken():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(live.state.store, "ids", broken)
    request = b"GET /v1/adapters HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        status, body = http_exchange(sock, request)
        assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
        status, _ = http_exchange(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
