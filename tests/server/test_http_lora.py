"""PEFT LoRA and PSOFT folders, uploaded unchanged, serves through HTTP and the engine in one batch with PiCa and base
requests; each answer equals its oracle (PEFT's own forward for LoRA and PSOFT, the dense merged model for PiCa)."""

import dataclasses
import threading

import httpx
import pytest
import torch
from peft import LoraConfig, PsoftConfig

from cache.basis_cache import BasisCache
from server.http.app import build_app
from tests.helpers import app_config, build_tiny_model, save_peft_adapter, write_random_adapter
from tests.server.live import LiveServer
from tests.server.test_http_errors import error_of
from tests.server.test_http_generate import native, upload

PROMPTS = ["The quick brown fox", "Once upon", "a b c d e f", "PiCa and LoRA"]


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "engine-process"])
def lora_live(tmp_path_factory, request):
    """The server with its engine in the HTTP process, and with the engine core in its own."""
    root = tmp_path_factory.mktemp("lora-srv")
    build_tiny_model(root / "model", "llama", seed=11)
    config = app_config(root, engine_process=request.param)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, max_lora_rank=8, max_psoft_rank=8,
                                                                    max_gpu_adapters=4))
    with LiveServer(build_app(config)) as server:
        yield server, root


@torch.no_grad()
def greedy(model, prompt_ids, max_tokens):
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def test_peft_lora_upload_serves_mixed_with_pica_and_base(lora_live, tmp_path):
    live, root = lora_live
    state = live.state
    peft_model, lora_folder = save_peft_adapter(
        root / "model", tmp_path / "lora", seed=2,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                               rank_pattern={"up_proj": 8}))
    response = upload(live.base_url, "tenant-lora", lora_folder)
    assert response.status_code == 201, response.text
    assert response.json()["method"] == "lora" and response.json()["r"] == 8
    psoft_model, psoft_folder = save_peft_adapter(root / "model", tmp_path / "psoft", seed=3,
                                                  peft_config=PsoftConfig(r=4, target_modules=["k_proj", "down_proj"]))
    response = upload(live.base_url, "tenant-psoft", psoft_folder)
    assert response.status_code == 201, response.text
    assert response.json()["method"] == "psoft" and response.json()["r"] == 4
    pica_folder = write_random_adapter(tmp_path / "pica", state.basis, r=6, seed=4)
    assert upload(live.base_url, "tenant-pica", pica_folder).status_code == 201

    listed = {a["id"]: a for a in httpx.get(f"{live.base_url}/v1/adapters").json()["data"]}
    assert (listed["tenant-lora"]["method"], listed["tenant-lora"]["r"]) == ("lora", 8)
    assert (listed["tenant-pica"]["method"], listed["tenant-pica"]["r"]) == ("pica", 6)
    cards = {c["id"]: c for c in httpx.get(f"{live.base_url}/v1/models").json()["data"]}
    assert (cards["tenant-lora"]["method"], cards["tenant-lora"]["r"]) == ("lora", 8)

    from adapters.merge import merge_adapter
    from server.model_loader import load_model

    cfg = state.config.model  # the basis with P from the cache the engine filled (a split front end holds no P)
    basis = BasisCache(cfg.basis_dir).load_or_compute(load_model(cfg).model, cfg.target_modules, cfg.rank_max,
                                                      method=cfg.svd_method)
    pica_model = merge_adapter(load_model(cfg).model, basis, state.store.load("tenant-pica"))
    with peft_model.disable_adapter():
        base_expected = {p: greedy(peft_model, state.tokenize(p), 8) for p in PROMPTS}
    expected = {None: base_expected, "tenant-pica": {p: greedy(pica_model, state.tokenize(p), 8) for p in PROMPTS},
                "tenant-lora": {p: greedy(peft_model, state.tokenize(p), 8) for p in PROMPTS},
                "tenant-psoft": {p: greedy(psoft_model, state.tokenize(p), 8) for p in PROMPTS}}
    assert expected["tenant-lora"] != expected[None] and expected["tenant-psoft"] != expected[None]

    results, threads = {}, []

    def run(adapter_id, prompt):
        events = native(live, adapter_id, stream=True, max_tokens=8, prompt=prompt)
        results[(adapter_id, prompt)] = [t for e in events for t in e["token_ids"]]

    for adapter_id in expected:  # all at once: the engine batches LoRA, PiCa and base tokens together
        for prompt in PROMPTS:
            threads.append(threading.Thread(target=run, args=(adapter_id, prompt)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(threads)
    for (adapter_id, prompt), tokens in results.items():
        assert tokens == expected[adapter_id][prompt], (adapter_id, prompt)

    metrics = httpx.get(f"{live.base_url}/metrics").text
    for method in ("lora", "psoft", "pica", "base"):
        line = next(l for l in metrics.splitlines()
                    if l.startswith("pica_method_requests_total{") and f'method="{method}"' in l and '"length"' in l)
        assert float(line.split()[-1]) >= len(PROMPTS), line


def test_refused_peft_upload_is_a_400_naming_the_reason(lora_live, tmp_path):
    live, root = lora_live
    _, folder = save_peft_adapter(root / "model", tmp_path / "dora",
                                  LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    err = error_of(upload(live.base_url, "tenant-dora", folder), 400)
    assert "DoRA rescales each column" in err["message"]
    assert "tenant-dora" not in live.state.store
