"""A client that gives up on a non-streaming request cancels it: nothing keeps running for it."""

import threading
import time

import httpx
import pytest


@pytest.fixture
def slow_steps(live, monkeypatch):
    """Each engine step takes 50 ms, so a 240-token request would run for 12 s."""
    engine = live.state.engine
    real = engine.step

    def slow_step():
        time.sleep(0.05)
        return real()

    monkeypatch.setattr(engine, "step", slow_step)
    return engine


def give_up(url: str, payload: dict) -> None:
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url, json=payload, timeout=0.5)


@pytest.mark.parametrize("path,payload", [
    ("/v1/generate", {"prompt": "hi", "max_tokens": 240, "ignore_eos": True}),
    ("/v1/completions", {"model": "BASE", "prompt": "hi", "max_tokens": 240, "ignore_eos": True, "n": 2}),
    ("/v1/chat/completions", {"model": "BASE", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                              "ignore_eos": True}),
])
def test_a_client_that_gives_up_leaves_no_request_running(live, slow_steps, path, payload):
    payload = {**payload, "model": live.state.model_name} if "model" in payload else payload
    clients = [threading.Thread(target=give_up, args=(live.base_url + path, payload)) for _ in range(3)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(30)
    deadline = time.monotonic() + 5  # the requests would need 10 s or more to finish on their own
    while time.monotonic() < deadline and (slow_steps.num_running or slow_steps.num_waiting):
        time.sleep(0.05)
    assert slow_steps.num_running == slow_steps.num_waiting == 0
    response = httpx.post(f"{live.base_url}/v1/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert response.status_code == 200
