"""End to end over HTTP: upload an adapter, generate with and without it (native, OpenAI, streaming)."""

import json
import time

import httpx
import openai
import pytest

from server.http.app import build_app
from tests.helpers import write_random_adapter
from tests.helpers import app_config
from tests.server.live import LiveServer

PROMPT = "The quick brown fox"


def upload(base_url, adapter_id, folder, headers=None):
    files = [
        ("files", ("adapter_config.json", (folder / "adapter_config.json").read_bytes(), "application/json")),
        ("files", ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes(), "application/octet-stream")),
    ]
    return httpx.post(f"{base_url}/v1/adapters", data={"adapter_id": adapter_id}, files=files, headers=headers, timeout=30)


def sse_events(response):
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


@pytest.fixture(scope="module")
def adapter_ids(live, tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    ids = []
    for i, r in enumerate((8, 3)):
        folder = write_random_adapter(root / f"a{i}", live.state.basis, r=r, seed=40 + i)
        response = upload(live.base_url, f"tenant-{i}.v1", folder)
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["id"] == f"tenant-{i}.v1" and body["method"] == "pica" and body["r"] == r
        assert body["num_params"] == sum(r * g.out_features for g in live.state.basis.groups.values())
        assert sorted(body["groups"]) == sorted(live.state.basis.groups) and len(body["checksum"]) == 64
        ids.append(body["id"])
    return ids


def native(live, adapter_id, stream=False, max_tokens=12, **kw):
    payload = {"prompt": PROMPT, "adapter_id": adapter_id, "max_tokens": max_tokens, "temperature": 0,
               "ignore_eos": True, "stream": stream, **kw}
    if not stream:
        response = httpx.post(f"{live.base_url}/v1/generate", json=payload, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()
    with httpx.stream("POST", f"{live.base_url}/v1/generate", json=payload, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response)


def test_generate_with_and_without_adapter_matches_oracle(live, adapter_ids, oracle):
    prompt_ids = live.state.tokenize(PROMPT)
    texts = {}
    for adapter_id in [None, *adapter_ids]:
        events = native(live, adapter_id, stream=True)
        tokens = [t for e in events for t in e["token_ids"]]
        assert tokens == oracle.greedy(adapter_id, prompt_ids, 12), adapter_id
        assert events[-1]["finish_reason"] == "length"
        assert events[-1]["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 12, "total_tokens": len(prompt_ids) + 12}
        body = native(live, adapter_id)
        assert body["text"] == "".join(e["text"] for e in events)
        assert body["adapter_id"] == adapter_id and body["finish_reason"] == "length"
        texts[adapter_id] = body["text"]
    assert len(set(texts.values())) == 3, "each adapter changes the output"


def test_openai_client_completions_and_chat(live, adapter_ids):
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused")
    model_ids = [m.id for m in client.models.list().data]
    assert model_ids[0] == live.state.model_name and set(adapter_ids) <= set(model_ids)
    for model in [live.state.model_name, adapter_ids[0]]:
        adapter_id = None if model == live.state.model_name else model
        expected = native(live, adapter_id, max_tokens=10)["text"]
        extra = {"ignore_eos": True}
        done = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, extra_body=extra)
        assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
        assert done.usage.completion_tokens == 10
        chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                                extra_body=extra))
        assert "".join(c.choices[0].text for c in chunks) == expected

        messages = [{"role": "user", "content": "Hi there"}]
        rendered = live.state.loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        chat_expected = httpx.post(f"{live.base_url}/v1/generate", timeout=60, json={
            "prompt": rendered, "adapter_id": adapter_id, "max_tokens": 10, "temperature": 0, "ignore_eos": True}).json()["text"]
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, extra_body=extra)
        assert chat.choices[0].message.content == chat_expected and chat.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, extra_body=extra)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_expected
        assert chunks[-1].usage.completion_tokens == 10


def test_n_choices_and_prompt_lists(live, adapter_ids):
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused")
    done = client.completions.create(model=adapter_ids[1], prompt=[PROMPT, "Another one"], n=2, max_tokens=5,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert done.choices[0].text == done.choices[1].text == native(live, adapter_ids[1], max_tokens=5)["text"]
    assert done.usage.completion_tokens == 20
    seeded = client.completions.create(model=adapter_ids[1], prompt=PROMPT, n=2, max_tokens=8, temperature=1.0, seed=7)
    again = client.completions.create(model=adapter_ids[1], prompt=PROMPT, n=2, max_tokens=8, temperature=1.0, seed=7)
    assert [c.text for c in seeded.choices] == [c.text for c in again.choices]


def test_logprobs_over_http(live, adapter_ids):
    body = native(live, adapter_ids[0], max_tokens=3, logprobs=2)
    assert len(body["logprobs"]) == 3
    first = body["logprobs"][0]
    assert first["top_logprobs"][0]["token_id"] == first["token_id"]  # greedy picks the top token
    assert first["logprob"] == pytest.approx(first["top_logprobs"][0]["logprob"]) and first["logprob"] <= 0
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused")
    chat = client.chat.completions.create(model=adapter_ids[0], messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})  # the random model's EOS is a near-tie here
    assert len(chat.choices[0].logprobs.content) == 2 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2


def test_stream_disconnect_cancels_the_request(live):
    engine = live.state.engine
    with httpx.stream("POST", f"{live.base_url}/v1/generate", timeout=60, json={
            "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30  # returns as soon as the engine drains
    while engine.has_work and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_work, "the disconnected request kept running"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_delete_then_404_and_restart_keeps_adapters(live, adapter_ids, server_root, tmp_path):
    folder = write_random_adapter(tmp_path / "tmp-adapter", live.state.basis, r=2, seed=99)
    assert upload(live.base_url, "short-lived", folder).status_code == 201
    assert httpx.get(f"{live.base_url}/v1/adapters/short-lived").status_code == 200
    response = httpx.delete(f"{live.base_url}/v1/adapters/short-lived")
    assert response.status_code == 204 and response.content == b""
    for method, path in (("GET", "/v1/adapters/short-lived"), ("DELETE", "/v1/adapters/short-lived")):
        response = httpx.request(method, live.base_url + path)
        assert response.status_code == 404 and "not found" in response.json()["error"]["message"]
    response = httpx.post(f"{live.base_url}/v1/generate", json={"prompt": "x", "adapter_id": "short-lived"})
    assert response.status_code == 404
    listed = [a["id"] for a in httpx.get(f"{live.base_url}/v1/adapters").json()["data"]]
    assert set(adapter_ids) <= set(listed) and "short-lived" not in listed

    before = native(live, adapter_ids[0])["text"]
    with LiveServer(build_app(app_config(server_root))) as restarted:
        assert restarted.state.basis.source == "loaded"
        listed = [a["id"] for a in httpx.get(f"{restarted.base_url}/v1/adapters").json()["data"]]
        assert set(adapter_ids) <= set(listed)
        assert native(restarted, adapter_ids[0])["text"] == before


def test_no_max_tokens_generates_until_the_context_is_full(live):
    """As OpenAI and vLLM: without max_tokens a request runs to EOS, bounded only by the context."""
    limit = live.state.engine.limits.max_model_len
    body = native(live, None, max_tokens=None)
    assert body["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == limit and body["usage"]["completion_tokens"] > 16
    chat = httpx.post(f"{live.base_url}/v1/chat/completions", timeout=60, json={
        "model": live.state.model_name, "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
        "ignore_eos": True}).json()
    assert chat["usage"]["total_tokens"] == limit and chat["choices"][0]["finish_reason"] == "length"


def test_get_one_model(live, adapter_ids):
    base = live.state.model_name
    card = httpx.get(f"{live.base_url}/v1/models/{base}").json()
    assert card["id"] == base and card["object"] == "model" and card["parent"] is None
    card = httpx.get(f"{live.base_url}/v1/models/{adapter_ids[0]}").json()
    assert card["id"] == adapter_ids[0] and card["parent"] == base and card["method"] == "pica"
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused")
    assert client.models.retrieve(adapter_ids[1]).id == adapter_ids[1]
    response = httpx.get(f"{live.base_url}/v1/models/ghost")
    assert response.status_code == 404 and "model 'ghost' not found" in response.json()["error"]["message"]
