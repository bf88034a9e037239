"""An adapter trained by `pica-serve train` on SmolLM2 learns a task the base model cannot do, generalises
to held-out words, and is served exactly as the merged model computes it.

The task: name a word's colour code, where animals are `blue`, fruits `green` and vehicles `red`. The
codes are arbitrary (the base model never answers them), so held-out accuracy can only come from
training, and it needs the model's own knowledge of which word is which kind of thing."""

import json

import httpx
import pytest
import torch

from adapters.merge import merge_adapter
from bench.colour_codes import KINDS, PROMPT
from server.cli import main
from server.model_loader import load_model

pytestmark = pytest.mark.real

WORDS = {code: KINDS[code] for code in ("blue", "green", "red")}
ADAPTER_ID = "colour-codes"


def split(held_out: bool) -> list[tuple[str, str]]:
    """Every fourth word of each kind is held out (15 words), the rest train (45)."""
    return [(word, code) for code, words in WORDS.items() for i, word in enumerate(words) if (i % 4 == 3) == held_out]


@pytest.fixture(scope="module")
def adapter_dir(real_cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("colour-codes")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": PROMPT.format(w), "completion": " " + c}) + "\n"
                            for w, c in split(held_out=False)))
    out = root / "adapter"
    argv = ["train", "--model", real_cfg.model, "--cache-dir", str(real_cfg.cache_dir), "--device", "cpu",
            "--dtype", "float32", "--target-modules", ",".join(real_cfg.target_modules), "--rank-max",
            str(real_cfg.rank_max), "--rank", "8", "--data", str(data), "--out", str(out), "--epochs", "10",
            "--batch-size", "8", "--lr", "1e-2", "--max-length", "32"]
    assert main(argv) == 0
    return out


def complete(live, model, word) -> str:
    body = {"model": model, "prompt": PROMPT.format(word), "max_tokens": 4, "temperature": 0}
    response = httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def accuracy(answers: dict[str, str]) -> float:
    held_out = split(held_out=True)
    return sum(answers[w].strip().split(maxsplit=1)[:1] == [c] for w, c in held_out) / len(held_out)


@pytest.fixture(scope="module")
def served(real_live, adapter_dir):
    real_live.state.store.provision(ADAPTER_ID, adapter_dir)
    words = [w for w, _ in split(held_out=True)]
    return {model: {w: complete(real_live, model, w) for w in words}
            for model in (real_live.state.model_name, ADAPTER_ID)}


def test_trained_adapter_beats_the_base_model_on_held_out_words(real_live, served):
    base, adapted = accuracy(served[real_live.state.model_name]), accuracy(served[ADAPTER_ID])
    assert adapted >= 0.8, served[ADAPTER_ID]  # 14 of 15 when written (the miss: mouse, as red)
    assert adapted - base >= 0.5, (base, adapted, served)  # the base model answered none


@torch.no_grad()
def test_served_adapter_equals_the_merged_model(real_live, real_cfg, served):
    loaded = load_model(real_cfg)
    merge_adapter(loaded.model, real_live.state.basis, real_live.state.store.load(ADAPTER_ID))
    tokenizer, eos = loaded.tokenizer, loaded.tokenizer.eos_token_id
    for word, text in served[ADAPTER_ID].items():
        ids = tokenizer(PROMPT.format(word))["input_ids"]
        generated = []
        while len(generated) < 4 and eos not in generated:
            generated.append(int(loaded.model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax()))
        assert text == tokenizer.decode([t for t in generated if t != eos]), word
