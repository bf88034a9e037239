"""Training produces adapters the server serves, with the served parameterisation."""

import json
import random

import httpx
import pytest
import torch

from adapters.format import AdapterExpectation, AdapterValidationError, load_adapter_dir
from adapters.layer import attach_adapters
from adapters.merge import merge_adapter
from adapters.train_data import DataError, _messages, load_examples
from adapters.trainer import TrainConfig, attach_trainable, train
from cache.basis_cache import BasisCache
from server.cli import main
from server.config import ModelConfig
from server.demo_model import build_byte_tokenizer
from server.model_loader import load_model
from tests.helpers import app_config, build_tiny_model

WORDS = ["zorbix", "quillan", "fremp", "dwaxo", "plunt", "glorvi", "snerk", "vomtra", "yibble", "krastel", "muxon", "teplar"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny model, a made-up word -> number task it cannot do, and its JSONL."""
    root = tmp_path_factory.mktemp("train")
    build_tiny_model(root / "model", "llama", seed=3, init_std=0.2)
    rng = random.Random(0)
    answers = {w: str(rng.randrange(10, 100)) for w in WORDS}
    rows = [{"prompt": f"Q: {w}\nA:", "completion": f" {a}\n"} for w, a in answers.items()]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, answers


def train_args(root, out, *extra):
    return ["train", "--model", str(root / "model"), "--device", "cpu", "--rank-max", "8", "--cache-dir", str(root / "cache"),
            "--data", str(root / "train.jsonl"), "--out", str(out), "--rank", "8", "--batch-size", "12",
            "--warmup-ratio", "0.1", "--lr", "2e-2", *extra]


def test_trained_adapter_answers_through_the_server(task):
    from server.http.app import build_app
    from tests.server.live import LiveServer

    root, answers = task
    assert main(train_args(root, root / "adapter", "--epochs", "150")) == 0
    with LiveServer(build_app(app_config(root))) as server:
        files = [("files", (name, (root / "adapter" / name).read_bytes()))
                 for name in ("adapter_config.json", "adapter_model.safetensors")]
        response = httpx.post(f"{server.base_url}/v1/adapters", data={"adapter_id": "word-task"}, files=files)
        assert response.status_code == 201, response.text

        def accuracy(adapter_id):
            correct = 0
            for word, answer in answers.items():
                body = httpx.post(f"{server.base_url}/v1/generate", timeout=30, json={
                    "prompt": f"Q: {word}\nA:", "adapter_id": adapter_id, "max_tokens": 4, "temperature": 0,
                    "stop": ["\n"]}).json()
                correct += body["text"].strip() == answer
            return correct / len(answers)

        assert accuracy("word-task") >= 0.9
        assert accuracy(None) <= 0.1


def test_gradient_of_shared_m_is_the_sum_over_its_layers(tmp_path, model_config_for):
    cfg = model_config_for(build_tiny_model(tmp_path / "m", "qwen2", init_std=0.2), rank_max=8)
    basis = BasisCache(cfg.basis_dir).load_or_compute(load_model(cfg).model, cfg.target_modules, 8, progress=False)
    ids = torch.randint(0, 250, (2, 9))
    model = load_model(cfg).model
    params = attach_trainable(model, basis, cfg.target_modules, rank=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)  # away from zero: a general point
    model(input_ids=ids, labels=ids).loss.backward()

    reference = load_model(cfg).model  # dense W_l = W0_l + M_g P_l, gradient taken on W_l
    ms = {g: p.detach() for g, p in params.items()}
    weights = {}
    for name, linear in reference.named_modules():
        group = name.rsplit(".", 1)[-1]
        if group in ms:
            with torch.no_grad():
                linear.weight += ms[group] @ basis.p[name][:8]
            linear.weight.requires_grad_(True)
            weights[name] = linear.weight
    reference(input_ids=ids, labels=ids).loss.backward()
    for group, p in params.items():
        # Algorithm 1 in PyTorch layout: grad(M_g) = sum over the group's layers of dL/dW_l @ P_l^T
        expected = sum(w.grad @ basis.p[n][:8].T for n, w in weights.items() if n.rsplit(".", 1)[-1] == group)
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4)
        assert expected.abs().max() > 1e-4


def test_saved_adapter_gives_the_trained_models_logits(task, tmp_path):
    root, _ = task
    model_cfg = ModelConfig(model=str(root / "model"), device="cpu", rank_max=8, cache_dir=root / "cache")
    cfg = TrainConfig(data=root / "train.jsonl", out=tmp_path / "a", rank=8, epochs=20, lr=2e-2, batch_size=4)
    _, trained, _, basis = train(cfg, model_cfg, progress=False)
    ids = torch.randint(0, 250, (3, 12))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    adapter = load_adapter_dir(tmp_path / "a", AdapterExpectation.from_basis(basis))
    assert adapter.config.basis_checksum == basis.checksum and adapter.config.basis_kind == "principal"
    merged = merge_adapter(load_model(model_cfg).model, basis, adapter)
    served = attach_adapters(load_model(model_cfg).model, basis, num_slots=1, max_rank=8)
    served.slot_stacks.write(0, adapter.slot_tensors())
    served.slot_index.set([0] * ids.numel())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(served.model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert (load_model(model_cfg).model(input_ids=ids).logits - expected).abs().max() > 1e-2


def test_resume_continues_exactly(task, tmp_path):
    root, _ = task
    model_cfg = ModelConfig(model=str(root / "model"), device="cpu", rank_max=8, cache_dir=root / "cache")
    base = dict(data=root / "train.jsonl", rank=8, epochs=6, lr=2e-2, batch_size=4, save_every=5)
    first, *_ = train(TrainConfig(out=tmp_path / "a", **base), model_cfg, progress=False)
    resumed, *_ = train(TrainConfig(out=tmp_path / "b", resume_from=tmp_path / "a-checkpoints" / "checkpoint-5", **base),
                        model_cfg, progress=False)
    assert first.step == resumed.step == 18 and resumed.losses[:5] == first.losses[:5]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    a = load_adapter_dir(tmp_path / "a", AdapterExpectation.from_basis(_basis(model_cfg)))
    b = load_adapter_dir(tmp_path / "b", AdapterExpectation.from_basis(_basis(model_cfg)))
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], atol=1e-6, rtol=1e-5)


def _basis(model_cfg):
    return BasisCache(model_cfg.basis_dir).load_or_compute(load_model(model_cfg).model, model_cfg.target_modules, 8,
                                                           progress=False)


def test_random_basis_is_recorded_and_refused_by_a_principal_server(task, tmp_path):
    root, _ = task
    assert main(train_args(root, tmp_path / "rand", "--epochs", "1", "--basis", "random", "--seed", "5")) == 0
    config = json.loads((tmp_path / "rand" / "adapter_config.json").read_text())
    model_cfg = ModelConfig(model=str(root / "model"), device="cpu", rank_max=8, cache_dir=root / "cache")
    principal = _basis(model_cfg)
    assert config["basis_kind"] == "random:5" and config["basis_checksum"] != principal.checksum
    with pytest.raises(AdapterValidationError, match="uses a 'random:5' basis, this server serves the 'principal'"):
        load_adapter_dir(tmp_path / "rand", AdapterExpectation.from_basis(principal))


def test_bad_rows_are_reported_with_line_numbers(tmp_path, capsys, task):
    root, _ = task
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"prompt": "ok", "completion": " fine"}),
        "{not json",
        json.dumps({"prompt": "no completion"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"prompt": "x", "completion": ""}),
        json.dumps(["a", "list"]),
    ]) + "\n")
    with pytest.raises(DataError) as info:
        load_examples(bad, build_byte_tokenizer(), 64)
    assert info.value.problems == [
        "line 2: not valid JSON (Expecting property name enclosed in double quotes)",
        "line 3: needs string 'prompt' and 'completion' (or 'messages')",
        "line 4: no assistant message: nothing to learn from",
        "line 5: 'completion' is empty",
        "line 6: a row must be a JSON object",
    ]
    args = train_args(root, tmp_path / "never", "--epochs", "1")
    args[args.index("--data") + 1] = str(bad)
    assert main(args) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_chat_rows_take_loss_on_assistant_tokens_only():
    tok = build_byte_tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"}]
    example = _messages(tok, messages)
    learned = tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != -100])
    assert learned == "hello\nciao\n"  # the template ends each message with a newline
    assert example.input_ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def test_the_default_recipe_learns_a_small_task_on_the_demo_model(tmp_path):
    """What a new user runs first: `pica-serve train` on the demo model with every training default."""
    from adapters.format import load_adapter_dir
    from server.demo_model import ensure_demo_model

    rng = random.Random(1)
    answers = {w: str(rng.randrange(10, 100)) for w in WORDS}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"Q: {w}\nA:", "completion": f" {a}\n"}) + "\n"
                                                  for w, a in answers.items()))
    common = ["--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", *common, "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "a")]) == 0
    cfg = ModelConfig(model=str(ensure_demo_model(tmp_path / "cache")), device="cpu", cache_dir=tmp_path / "cache")
    loaded = load_model(cfg)
    basis = BasisCache(cfg.basis_dir).load_or_compute(loaded.model, cfg.target_modules, cfg.rank_max, progress=False)

    def accuracy(model):
        correct = 0
        for word, answer in answers.items():
            ids = loaded.tokenizer(f"Q: {word}\nA:", return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            correct += loaded.tokenizer.decode(out[0, ids.shape[1]:]).split("\n")[0].strip() == answer
        return correct / len(answers)

    assert accuracy(loaded.model) == 0
    merged = merge_adapter(loaded.model, basis, load_adapter_dir(tmp_path / "a", AdapterExpectation.from_basis(basis)))
    assert accuracy(merged) >= 0.9
