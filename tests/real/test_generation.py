"""SmolLM2 through our engine and HTTP server: it knows facts, chats through its template, and its
logprobs equal transformers' own on the same weights."""

import httpx
import pytest
import torch

from cache.basis_cache import BasisCache
from server.chat_template import encode_chat
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.model_loader import load_model, model_source
from tests.engine.conftest import run_to_completion

pytestmark = pytest.mark.real


def test_greedy_completion_names_paris(real_live):
    body = {"model": real_live.state.model_name, "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0}
    response = httpx.post(f"{real_live.base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["text"]


def test_chat_completion_applies_the_template_and_stops_at_im_end(real_live):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    body = {"model": real_live.state.model_name, "messages": messages, "max_tokens": 48, "temperature": 0}
    response = httpx.post(f"{real_live.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    text = answer["choices"][0]["message"]["content"]
    assert "Paris" in text and "<|im" not in text
    assert answer["choices"][0]["finish_reason"] == "stop", "ends at <|im_end|>, the GGUF metadata's eos"
    tokenizer = real_live.state.loaded.tokenizer
    prompt_ids = encode_chat(tokenizer, messages, add_generation_prompt=True)
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids)
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


def test_engine_logprobs_equal_transformers_teacher_forced_fp32(real_cfg):
    from transformers import AutoModelForCausalLM

    loaded = load_model(real_cfg)
    basis = BasisCache(real_cfg.basis_dir).load_or_compute(loaded.model, real_cfg.target_modules, real_cfg.rank_max,
                                                           progress=False)
    engine = Engine(loaded, basis, EngineConfig(max_num_seqs=8, max_num_batched_tokens=48, max_model_len=256))
    tokenize = lambda text: loaded.tokenizer(text)["input_ids"]  # noqa: E731
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"lp{i}", tokenize(prompt),
                           SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0))
    for i, prompt in enumerate(["Once upon a time", "1, 2, 3, 4,", "The quick brown fox jumps over the lazy dog"]):
        engine.add_request(f"other{i}", tokenize(prompt),  # sampled company in the same batches
                           SamplingParams(max_tokens=6 + 4 * i, temperature=0.8, seed=i, ignore_eos=True))
    got = {}
    for _ in range(1000):
        if not engine.has_work:
            break
        for out in engine.step()[0]:
            got.setdefault(out.request_id, []).extend(out.logprobs)
    assert not engine.has_work

    reference = AutoModelForCausalLM.from_pretrained(model_source(real_cfg), dtype=torch.float32).eval()
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = tokenize(prompt)
        generated = [lp.token_id for lp in got[f"lp{i}"]]
        assert len(generated) == 10
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([prompt_ids + generated])).logits[0]
        ref = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)
        ours = torch.tensor([lp.logprob for lp in got[f"lp{i}"]])
        assert generated == ref.argmax(-1).tolist(), prompt
        torch.testing.assert_close(ours, ref.gather(1, torch.tensor(generated)[:, None])[:, 0], atol=5e-5, rtol=0)  # 8e-6 seen
