"""The paper's ablation on a small model: principal vs random basis, shared vs unshared B, same budget.

    python bench/ablation.py --out bench/results/ablation-h100.json

No pretrained weights can be fetched here, and a random-init model has no meaningful principal
subspace, so a small Llama is first pretrained briefly on synthetic English-like text; then each
variant fine-tunes the same copy of it (same rank, steps, learning rate, data) on a task with
held-out evaluation: lowercase word -> uppercase word. A toy check of the machinery and of the
direction of the effects, not a reproduction of the paper's numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import string
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.train_data import IGNORE, Example, collate  # noqa: E402
from adapters.trainer import TrainConfig, attach_trainable, fit  # noqa: E402
from cache.basis_cache import BasisCache  # noqa: E402
from server.config import DEFAULT_TARGET_MODULES  # noqa: E402
from server.demo_model import build_byte_tokenizer  # noqa: E402

NOUNS = ["river", "stone", "garden", "window", "market", "forest", "letter", "engine", "island", "bridge", "candle", "mirror"]
VERBS = ["finds", "keeps", "moves", "opens", "paints", "hears", "builds", "carries", "follows", "watches"]
ADJ = ["quiet", "bright", "heavy", "small", "ancient", "green", "broken", "warm", "hidden", "narrow"]


def tail_mean(values: list[float], n: int) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


def sentence(rng: random.Random) -> str:
    word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))  # noqa: E731
    subject, obj = rng.choice(NOUNS), rng.choice(NOUNS + [word()])
    s = f"the {rng.choice(ADJ)} {subject} {rng.choice(VERBS)} a {rng.choice(ADJ)} {obj}."
    if rng.random() < 0.3:
        w = word()
        s += f" {w} is written {w.upper()}."  # copy + case patterns appear in pretraining too
    return s


def pretrain(model, tokenizer, steps: int, seq_len: int, batch: int, rng: random.Random) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    model.train()
    for step in range(steps):
        rows = []
        for _ in range(batch):
            text = ""
            while len(text) < seq_len:
                text += sentence(rng) + " "
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len])
        ids = torch.tensor(rows, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in optimizer.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    return losses


def task_examples(tokenizer, words: list[str]) -> list[Example]:
    out = []
    for w in words:
        prompt = tokenizer(f"lower: {w}\nupper:", add_special_tokens=False)["input_ids"]
        completion = tokenizer(f" {w.upper()}\n", add_special_tokens=False)["input_ids"]
        out.append(Example(prompt + completion, [IGNORE] * len(prompt) + completion))
    return out


@torch.no_grad()
def evaluate(model, tokenizer, examples, words) -> dict:
    losses = []
    for i in range(0, len(examples), 64):
        batch = {k: v.cuda() for k, v in collate(examples[i : i + 64], tokenizer.pad_token_id).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(float(model(**batch).loss))
    correct = 0
    for w in words:
        ids = torch.tensor([tokenizer(f"lower: {w}\nupper:", add_special_tokens=False)["input_ids"]], device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.generate(ids, max_new_tokens=len(w) + 2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        correct += tokenizer.decode(out[0, ids.shape[1]:]).strip() == w.upper()
    return {"eval_loss": sum(losses) / len(losses), "eval_exact_match": correct / len(words)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(0)
    torch.manual_seed(0)
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    base = LlamaForCausalLM(config).cuda()
    start = time.perf_counter()
    pretrain_losses = pretrain(base, tokenizer, args.pretrain_steps, 128, 64, rng)
    report = {"device": torch.cuda.get_device_name(), "pretrain_steps": args.pretrain_steps,
              "pretrain_seconds": time.perf_counter() - start, "pretrain_final_loss": tail_mean(pretrain_losses, 20),
              "rank": args.rank, "epochs": args.epochs, "lr": args.lr, "command": " ".join(sys.argv)}
    words = sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 7))) for _ in range(700)})
    rng.shuffle(words)
    train_words, eval_words = words[:500], words[500:650]
    train_set, eval_set = task_examples(tokenizer, train_words), task_examples(tokenizer, eval_words)
    report["before_finetuning"] = evaluate(base, tokenizer, eval_set, eval_words)
    cfg = TrainConfig(data=Path("-"), out=Path("-"), rank=args.rank, epochs=args.epochs, lr=args.lr, batch_size=32,
                      warmup_ratio=0.05)
    rows = []
    for basis_kind in ("principal", "random:0"):
        with torch.no_grad():
            basis = BasisCache(Path("/tmp/ablation-basis")).load_or_compute(
                base, DEFAULT_TARGET_MODULES, args.rank, kind=basis_kind, progress=False, device="cuda")
        for shared in (True, False):
            model = copy.deepcopy(base)
            model.requires_grad_(False)
            params = attach_trainable(model, basis, DEFAULT_TARGET_MODULES, args.rank, share_m=shared)
            state = fit(model, params, train_set, cfg, tokenizer.pad_token_id, progress=False)
            row = {"basis": basis_kind.split(":")[0], "m": "shared" if shared else "per-layer",
                   "trainable_params": sum(p.numel() for p in params.values()),
                   "final_train_loss": tail_mean(state.losses, 10), **evaluate(model, tokenizer, eval_set, eval_words)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report["rows"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{report['device']}: small Llama (4x256) pretrained {args.pretrain_steps} steps on synthetic text "
          f"(loss {report['pretrain_final_loss']:.3f}), then lowercase->uppercase, rank {args.rank}, "
          f"{args.epochs} epochs; before fine-tuning: {report['before_finetuning']}")
    print(f"{'basis':<10}{'M':<11}{'params':>9}{'train loss':>12}{'eval loss':>11}{'eval exact':>12}")
    for r in rows:
        print(f"{r['basis']:<10}{r['m']:<11}{r['trainable_params']:>9}{r['final_train_loss']:>12.4f}"
              f"{r['eval_loss']:>11.4f}{r['eval_exact_match']:>12.1%}")


if __name__ == "__main__":
    main()
