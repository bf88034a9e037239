"""The contract with Kubernetes gateways: our /metrics read the way their pod pickers read vLLM's.

The parser follows the Gateway API Inference Extension's endpoint picker (its model server protocol and
metrics extractor): Prometheus text format; a gauge's value from the first series of its family (no
timestamps are exposed, so none is newer); for `vllm:lora_requests_info` the series with the largest
value is the latest, its adapter labels split on commas (blanks dropped) and `max_lora` an integer.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import MAX_LORA_INFO_IDS, vllm_families
from tests.helpers import write_random_adapter
from tests.server.test_http_generate import upload


@dataclass(frozen=True)
class PodMetrics:
    """What the endpoint picker keeps about a pod after one scrape."""

    running: float
    waiting: float
    kv_cache_usage: float
    max_lora: int
    running_adapters: frozenset[str]
    waiting_adapters: frozenset[str]
    lora_info_time: float


def split_adapters(label: str) -> frozenset[str]:
    return frozenset(name.strip() for name in label.split(",") if name.strip())


def parse_pod_metrics(text: str) -> PodMetrics:
    families = {family.name: family for family in text_string_to_metric_families(text)}

    def gauge(name):  # a counter or untyped family would read as 0 in the picker
        family = families[name]
        assert family.type == "gauge" and family.samples, name
        return family.samples[0]

    lora = families["vllm:lora_requests_info"]
    assert lora.type == "gauge" and lora.samples
    latest = max(lora.samples, key=lambda sample: sample.value)
    return PodMetrics(
        gauge("vllm:num_requests_running").value,
        gauge("vllm:num_requests_waiting").value,
        gauge("vllm:kv_cache_usage_perc").value,
        int(latest.labels["max_lora"]),
        split_adapters(latest.labels["running_lora_adapters"]),
        split_adapters(latest.labels["waiting_lora_adapters"]),
        latest.value,
    )


def scrape(server) -> PodMetrics:
    response = httpx.get(server.base_url + "/metrics", timeout=30)
    assert response.status_code == 200
    return parse_pod_metrics(response.text)


def scrape_until(server, check, seconds: float = 60) -> PodMetrics:
    """Scrape until `check` holds (the engine thread takes a step or its inbox); fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        metrics = scrape(server)
        if check(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.02)


@contextmanager
def one_step_at_a_time(engine):
    """Let the engine run a step only when the test releases one, so the queues it scrapes hold still."""
    permits = threading.Semaphore(0)
    step = engine.step

    def held_step():
        permits.acquire(timeout=60)  # bounded: a failing test cannot stall the server for long
        return step()

    engine.step = held_step
    try:
        yield permits
    finally:
        del engine.step  # the class's step again
        permits.release(4)  # wakes a step still waiting


def test_endpoint_picker_reads_queues_kv_and_adapters(live, tmp_path):
    url, engine = live.base_url, live.state.engine
    for i, adapter_id in enumerate(("gw-a", "gw-b", "gw-c")):
        folder = write_random_adapter(tmp_path / adapter_id, live.state.basis, r=2, seed=20 + i)
        assert upload(url, adapter_id, folder).status_code == 201
    idle = scrape(live)
    assert (idle.running, idle.waiting, idle.kv_cache_usage) == (0, 0, 0)
    assert idle.max_lora == engine.cfg.max_gpu_adapters == 2
    assert idle.running_adapters == idle.waiting_adapters == frozenset()

    def request(model):  # streaming, so entering returns once the server queued it
        return client.stream("POST", f"{url}/v1/completions", json={
            "model": model, "prompt": "hold on", "max_tokens": 200, "ignore_eos": True, "stream": True})

    with httpx.Client(timeout=60) as client, ExitStack() as streams, one_step_at_a_time(engine) as permits:
        streams.enter_context(request("gw-a"))
        first = scrape_until(live, lambda m: m.waiting == 1)
        assert first.waiting_adapters == {"gw-a"} and first.running_adapters == frozenset()
        for model in ("gw-b", "gw-c", live.state.model_name):  # taken in when gw-a's first step ends
            streams.enter_context(request(model))

        permits.release()  # step 1 admits gw-a alone
        second = scrape_until(live, lambda m: m.waiting == 3)
        assert (second.running, second.waiting) == (1, 3)
        assert second.running_adapters == {"gw-a"} and second.waiting_adapters == {"gw-b", "gw-c"}
        assert second.kv_cache_usage > 0

        permits.release()  # step 2: gw-b takes the second slot, gw-c waits for one, the base model needs none
        third = scrape_until(live, lambda m: m.running == 3)
        assert (third.running, third.waiting) == (3, 1)
        assert third.running_adapters == {"gw-a", "gw-b"} and third.waiting_adapters == {"gw-c"}
        assert 0 < third.kv_cache_usage <= 1
        assert third.lora_info_time >= second.lora_info_time >= first.lora_info_time
        assert abs(third.lora_info_time - time.time()) < 600  # unix seconds, not a monotonic clock
    deadline = time.monotonic() + 60  # the closed streams cancel their requests
    while engine.has_work and time.monotonic() < deadline:
        time.sleep(0.05)
    after = scrape(live)
    assert (after.running, after.waiting) == (0, 0) and after.running_adapters == after.waiting_adapters == frozenset()


def test_lora_info_is_one_series_with_capped_lists(live):
    """One series per scrape (so 'largest value' is unambiguous) and short labels."""
    text = httpx.get(live.base_url + "/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(lines) == 1
    assert 'max_lora="2"' in lines[0] and "model_name" not in lines[0]
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc"):
        assert f'{name}{{model_name="{live.state.model_name}"}}' in text, name


def test_lora_info_lists_are_capped_oldest_first():
    waiting = [f"adapter-{i}" for i in range(MAX_LORA_INFO_IDS + 5)]
    engine = SimpleNamespace(num_running=0, num_waiting=len(waiting), cfg=SimpleNamespace(max_gpu_adapters=4),
                             adapter_ids_by_state=lambda: ([], waiting))
    families = {f.name: f for f in vllm_families(SimpleNamespace(engine=engine, model_name="base"), 0.0)}
    labels = families["vllm:lora_requests_info"].samples[0].labels
    assert labels["waiting_lora_adapters"].split(",") == waiting[:MAX_LORA_INFO_IDS]
    assert labels["running_lora_adapters"] == "" and labels["max_lora"] == "4"


def test_models_list_names_the_base_first_and_adapters_by_parent(live, tmp_path):
    """production-stack's router takes the first entry as the pod's model and adapters by `parent`."""
    folder = write_random_adapter(tmp_path / "gw-models", live.state.basis, r=2, seed=30)
    assert upload(live.base_url, "gw-models", folder).status_code == 201
    cards = httpx.get(live.base_url + "/v1/models").json()["data"]
    base = live.state.model_name
    assert cards[0]["id"] == base and cards[0]["parent"] is None
    adapters = {card["id"]: card for card in cards[1:]}
    assert "gw-models" in adapters
    assert all(card["parent"] == base and card["root"] == base for card in adapters.values())
