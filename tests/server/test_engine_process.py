"""The engine core in its own process, through real processes: the HTTP front end in this one (uvicorn in a
thread) or `pica-serve serve` as a subprocess, the core spawned by it.

Several of the in-process HTTP tests run here again unchanged against the split server (imported below),
so both engines answer the same; the tests written here cover what only the split has: detokenization and
stop strings in the front end, concurrency, cancellation, adapter changes while requests run, a core that
dies (clean errors, /ready 503, the server exits non-zero) and a core that cannot start.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cache.basis_cache import BasisCache
from server.http.app import build_app
from server.model_loader import load_model
from tests.server.conftest import Oracle
from tests.helpers import app_config, write_random_adapter
from tests.server.live import LiveServer, free_port
from tests.server.test_http_errors import (  # noqa: F401 - collected again, against the split server
    test_a_bad_seed_fails_only_its_own_request,
    test_generate_bad_input,
    test_openai_bad_input,
    test_queue_full_is_429,
    test_server_still_serves_after_bad_input,
)
from tests.server.test_http_generate import (  # noqa: F401 - collected again, against the split server
    adapter_ids,
    test_generate_with_and_without_adapter_matches_oracle,
    test_get_one_model,
    test_logprobs_over_http,
    test_n_choices_and_prompt_lists,
    upload,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(server_root):
    with LiveServer(build_app(app_config(server_root, engine_process=True))) as server:
        assert not server.state.engine_in_process and server.state.async_engine.process.is_alive()
        yield server


@pytest.fixture(scope="module")
def oracle(live):
    """The dense merged model's greedy tokens; the basis (with P) from the cache the core filled."""
    cfg = live.state.config.model
    basis = BasisCache(cfg.basis_dir).load_or_compute(load_model(cfg).model, cfg.target_modules, cfg.rank_max,
                                                      method=cfg.svd_method)
    assert basis.checksum == live.state.basis.checksum
    return Oracle(cfg, basis, live.state.store)


def generate(live, stream=False, timeout=60, **payload):
    body = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": True, **payload,
            "stream": stream}
    if not stream:
        return httpx.post(f"{live.base_url}/v1/generate", json=body, timeout=timeout)
    with httpx.stream("POST", f"{live.base_url}/v1/generate", json=body, timeout=timeout) as response:
        assert response.status_code == 200
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def metric(base_url: str, name: str, labels: str = "") -> float:
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.split(" ")[0] == name + labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_stop_strings_are_found_in_the_front_end(live):
    """The core sends ids only: the front end's text, its stop-string cut and finish_reason match what the
    text without a stop string says, streaming or not."""
    full = generate(live, max_tokens=24).json()
    text = full["text"]
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].strip() and text[i:i + 2] not in text[:i])
    cut = generate(live, max_tokens=24, stop=[stop]).json()
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]
    events = generate(live, stream=True, max_tokens=24, stop=[stop])
    assert "".join(e["text"] for e in events) == cut["text"] and events[-1]["finish_reason"] == "stop"
    streamed = generate(live, stream=True, max_tokens=24)
    assert "".join(e["text"] for e in streamed) == text and sum(len(e["token_ids"]) for e in streamed) == 24
    # the core frees the stopped requests, and counts them as stopped, not aborted
    assert wait_until(lambda: metric(live.base_url, "pica_requests_running") == 0)
    assert metric(live.base_url, "pica_adapter_requests_total", '{adapter="base",finish_reason="stop"}') >= 2


def test_concurrent_requests_equal_each_alone(live, adapter_ids):
    """16 requests at once (streaming and not, base and two adapters) give exactly what each gives alone."""
    jobs = [dict(adapter_id=[None, *adapter_ids][i % 3], prompt=f"request number {i} says", max_tokens=8 + i % 5,
                 stream=i % 2 == 0) for i in range(16)]

    def text_of(job):
        result = generate(live, **job)
        return "".join(e["text"] for e in result) if job["stream"] else result.json()["text"]

    alone = [text_of(job) for job in jobs]
    together = [None] * len(jobs)

    def run(i):
        together[i] = text_of(jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == alone and len(set(alone)) > 3


def test_cancelled_requests_free_the_core(live):
    """A stream the client leaves and a non-streaming request the client gives up on are aborted in the
    core (counted as aborts, KV freed), not run to their 240 tokens."""
    aborted = metric(live.base_url, "pica_adapter_requests_total", '{adapter="base",finish_reason="abort"}')
    body = {"prompt": "keep going", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{live.base_url}/v1/generate", json={**body, "stream": True}, timeout=60) as response:
        assert next(response.iter_lines()).startswith("data: ")
    with pytest.raises(httpx.TimeoutException):  # gone long before 240 tokens (the server polls every 0.05 s)
        httpx.post(f"{live.base_url}/v1/generate", json=body, timeout=0.1)
    assert wait_until(lambda: metric(live.base_url, "pica_requests_running") == 0
                      and metric(live.base_url, "pica_kv_cache_usage_ratio") == 0)
    assert wait_until(lambda: metric(live.base_url, "pica_adapter_requests_total",
                                     '{adapter="base",finish_reason="abort"}') == aborted + 2)


def test_adapter_upload_and_delete_while_requests_run(live, tmp_path):
    """Requests running on an adapter that is deleted finish; new ones get 404; a re-upload under the same
    id serves the new weights; an upload while others decode is served at once."""
    old = write_random_adapter(tmp_path / "old", live.state.basis, r=4, seed=70)
    new = write_random_adapter(tmp_path / "new", live.state.basis, r=4, seed=71)
    assert upload(live.base_url, "swap", old).status_code == 201
    before = generate(live, adapter_id="swap", max_tokens=10).json()["text"]
    results = {}

    def long_stream():
        results["stream"] = generate(live, stream=True, adapter_id="swap", max_tokens=200)

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert wait_until(lambda: metric(live.base_url, "pica_requests_running") == 1)
    assert httpx.delete(f"{live.base_url}/v1/adapters/swap").status_code == 204
    assert generate(live, adapter_id="swap").status_code == 404
    assert upload(live.base_url, "swap", new).status_code == 201
    after = generate(live, adapter_id="swap", max_tokens=10).json()["text"]
    other = write_random_adapter(tmp_path / "other", live.state.basis, r=2, seed=72)
    assert upload(live.base_url, "other", other).status_code == 201
    assert generate(live, adapter_id="other").status_code == 200
    thread.join(120)
    assert results["stream"][-1]["finish_reason"] == "length" and results["stream"][-1]["usage"]["completion_tokens"] == 200
    assert after != before
    assert after == generate(live, adapter_id="swap", max_tokens=10).json()["text"]
    assert metric(live.base_url, "pica_adapter_swap_seconds_count", '{path="disk_to_host"}') >= 2


def test_step_host_time_is_counted(live):
    generate(live, max_tokens=6)
    assert metric(live.base_url, "pica_engine_steps_total", '{kind="decode"}') > 0
    assert metric(live.base_url, "pica_engine_step_host_seconds_total", '{kind="decode"}') > 0


def test_a_core_that_dies_ends_requests_cleanly(server_root, tmp_path):
    """Kill the core mid-request: the stream ends with an error event, the non-streaming request with a 503
    JSON body, /ready and new requests say 503, and the store keeps every adapter."""
    root = tmp_path
    (root / "model").symlink_to(server_root / "model")
    with LiveServer(build_app(app_config(root, engine_process=True))) as live:
        folder = write_random_adapter(tmp_path / "kept", live.state.basis, r=2, seed=80)
        assert upload(live.base_url, "kept", folder).status_code == 201
        body = {"prompt": "keep going", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
        results = {}

        def non_streaming():
            results["plain"] = httpx.post(f"{live.base_url}/v1/generate", json={**body, "adapter_id": "kept"}, timeout=60)

        thread = threading.Thread(target=non_streaming)
        with httpx.stream("POST", f"{live.base_url}/v1/generate", json={**body, "stream": True}, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            thread.start()
            assert wait_until(lambda: metric(live.base_url, "pica_requests_running") == 2)
            os.kill(live.state.async_engine.process.pid, signal.SIGKILL)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
        thread.join(30)
        error = events[-1]["error"]
        assert error["type"] == "service_unavailable" and "engine core process exited" in error["message"]
        assert results["plain"].status_code == 503
        assert "engine core process exited" in results["plain"].json()["error"]["message"]
        assert httpx.get(f"{live.base_url}/ready").status_code == 503
        assert httpx.post(f"{live.base_url}/v1/generate", json=body).status_code == 503
        assert httpx.get(f"{live.base_url}/health").status_code == 200  # the process answers until it stops
    assert (root / "adapters" / "kept" / "adapter_model.safetensors").is_file()


def core_pid(server_pid: int) -> int | None:
    """The engine core among the server's children (not multiprocessing's resource tracker); Linux's /proc
    lists children per thread, and a thread of the server's executor starts the core."""
    children = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmdline:
            return int(pid)
    return None


def serve(root: Path, model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--port", str(port), "--cache-dir",
           str(root / "cache"), "--adapter-dir", str(root / "adapters"), "--rank-max", "8", "--max-model-len", "256"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT), \
        f"http://127.0.0.1:{port}"


def test_the_server_exits_non_zero_when_its_core_dies(server_root, tmp_path):
    proc, url = serve(tmp_path, server_root / "model", tmp_path / "server.log")
    try:
        assert wait_until(lambda: _ready(url), seconds=180), (tmp_path / "server.log").read_text()[-3000:]
        pid = core_pid(proc.pid)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "engine core process exited" in (tmp_path / "server.log").read_text()


def test_a_core_that_cannot_start_says_why_and_exits(tmp_path):
    """A model folder the core cannot load: the server reports the cause and exits 1, it does not hang."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    proc, _ = serve(tmp_path, broken, tmp_path / "server.log")
    try:
        assert proc.wait(timeout=180) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "server.log").read_text()
    assert "start-up failed" in log and "config.json" in log.split("start-up failed")[-1]


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
