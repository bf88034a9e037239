"""Training PiCa adapters with the served parameterisation.

The base model is frozen; every target linear of group g computes `W0 x + M_g (P_l x)` with the
canonical basis P_l [r, in] from the basis cache (so the adapter records its `basis_checksum`) and
one zero-initialised M_g [out, r] shared by all layers of the group. Plain AdamW on M through
autograd is the paper's Algorithm 1: the gradient reaching M_g is the sum over the group's layers
of dL/dW_l P_l^T, and Adam's moments live in out x r space. Checkpoints are adapter folders the server
serves, plus the optimizer state as safetensors (nothing is pickled), so training can resume.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterConfig, save_adapter_dir
from adapters.targets import find_target_linears, group_of, replace_module
from adapters.train_data import collate, load_examples
from cache.basis_cache import BasisCache
from server.config import ModelConfig
from server.model_loader import load_model

log = logging.getLogger(__name__)
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    rank: int = 16
    target_modules: tuple[str, ...] | None = None
    """Groups to train; None = every group the basis covers."""
    epochs: int | None = None
    """Passes over the data; None: 3, or more where that is under DEFAULT_MIN_STEPS optimizer steps."""
    lr: float = 5e-3
    batch_size: int = 8
    max_length: int = 512
    warmup_ratio: float = 0.03
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    basis: str = "principal"
    """'principal', or 'random' (a random orthonormal basis seeded by `seed`: the paper's ablation)."""
    save_every: int = 0
    """Save a checkpoint every N optimizer steps (0 = only at the end of each epoch)."""
    resume_from: Path | None = None
    checkpoint_dir: Path | None = None
    """Where `checkpoint-N/` folders go; None = `<out>-checkpoints` beside `out`, never inside it, so that
    an archive of `out` holds one adapter."""

    def __post_init__(self):
        problems = [f"{n} must be >= 1" for n in ("rank", "epochs", "batch_size", "max_length")
                    if getattr(self, n) is not None and getattr(self, n) < 1]
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}")
        if self.basis not in ("principal", "random"):
            problems.append("basis must be 'principal' or 'random'")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1:
            problems.append("lr must be > 0 and warmup_ratio in [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def checkpoints(self) -> Path:
        out = Path(self.out)
        return Path(self.checkpoint_dir) if self.checkpoint_dir else out.parent / f"{out.name}-checkpoints"

    @property
    def basis_kind(self) -> str:
        return "principal" if self.basis == "principal" else f"random:{self.seed}"


class PiCaTrainLinear(nn.Module):
    """W0 x + M (P x) with W0 and P frozen and M a (possibly shared) trainable parameter."""

    def __init__(self, base: nn.Linear, p: torch.Tensor, m: nn.Parameter):
        super().__init__()
        self.base = base
        self.register_buffer("p", p, persistent=False)  # [r, in]
        self.m = m  # [out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.p.to(x.dtype)), self.m.to(x.dtype))


def attach_trainable(model: nn.Module, basis, groups: tuple[str, ...], rank: int, share_m: bool = True
                     ) -> dict[str, nn.Parameter]:
    """Wrap the groups' linears; returns the trainable M's by group (or by layer when not shared)."""
    params: dict[str, nn.Parameter] = {}
    device = next(model.parameters()).device
    for name, linear in find_target_linears(model, groups).items():
        group = group_of(name)
        key = group if share_m else name
        if key not in params:
            params[key] = nn.Parameter(torch.zeros(linear.out_features, rank, device=device, dtype=torch.float32))
        p = basis.p[name][:rank].to(device=device, dtype=torch.float32)
        replace_module(model, name, PiCaTrainLinear(linear, p, params[key]))
    return params


DEFAULT_MIN_STEPS = 200
"""A default run takes at least this many optimizer steps: on a demo task of 12 rows, 3 epochs (6 steps)
at lr 1e-3 learned nothing, 200 steps at 5e-3 answered all 12 (tiny random Llama, r=16)."""


def num_epochs(cfg: TrainConfig, steps_per_epoch: int) -> int:
    if cfg.epochs is not None:
        return cfg.epochs
    return max(3, math.ceil(DEFAULT_MIN_STEPS / steps_per_epoch))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class FitState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


def fit(model, params: dict[str, nn.Parameter], examples, cfg: TrainConfig, pad_id: int, state: FitState | None = None,
        optimizer_state: dict | None = None, on_checkpoint=None, progress: bool = True) -> FitState:
    """Plain AdamW on the M's; checkpoints through on_checkpoint(state, optimizer)."""
    state = state or FitState()
    device = next(iter(params.values())).device
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state:
        for key, p in params.items():
            optimizer.state[p] = {"step": torch.tensor(float(state.step)), **optimizer_state[key]}
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    epochs = num_epochs(cfg, steps_per_epoch)
    total = epochs * steps_per_epoch
    warmup = int(cfg.warmup_ratio * total)
    use_autocast = device.type == "cuda"
    model.eval()  # no dropout; gradients still reach M
    bar = tqdm(total=total, initial=state.step, desc="training", unit="step", disable=not progress)
    for epoch in range(epochs):
        order = list(range(len(examples)))
        random.Random(cfg.seed + epoch).shuffle(order)
        for i in range(steps_per_epoch):
            if epoch * steps_per_epoch + i < state.step:
                continue  # resumed: already done
            batch = collate([examples[j] for j in order[i * cfg.batch_size : (i + 1) * cfg.batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(state.step, total, warmup, cfg.schedule)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
            if on_checkpoint and (cfg.save_every and state.step % cfg.save_every == 0 or i == steps_per_epoch - 1):
                on_checkpoint(state, optimizer)
    bar.close()
    return state


def adapter_tensors(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The adapter file's tensors: `M.<group>` [out, r] in float32."""
    return {f"M.{g}": p.detach().float().cpu() for g, p in params.items()}


def save_checkpoint(folder: Path, adapter_config: AdapterConfig, params, optimizer, state: FitState, cfg) -> None:
    save_adapter_dir(folder, adapter_config, adapter_tensors(params))
    moments = {}
    for g, p in params.items():
        for name in ("exp_avg", "exp_avg_sq"):
            moments[f"{name}.{g}"] = optimizer.state[p][name].detach().cpu().contiguous()
    save_file(moments, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps({"step": state.step, "losses": state.losses,
                                                 "config": {k: str(v) for k, v in asdict(cfg).items()}}, indent=1))


def load_checkpoint(folder: Path, params, device) -> tuple[FitState, dict]:
    """M values, optimizer moments and step from a checkpoint folder (safetensors + JSON only)."""
    weights = load_file(str(folder / WEIGHTS_FILE))
    moments = load_file(str(folder / STATE_TENSORS))
    meta = json.loads((folder / STATE_JSON).read_text())
    with torch.no_grad():
        for g, p in params.items():
            p.copy_(weights[f"M.{g}"].to(device))
    optimizer_state = {g: {n: moments[f"{n}.{g}"].to(device) for n in ("exp_avg", "exp_avg_sq")} for g in params}
    return FitState(meta["step"], meta["losses"]), optimizer_state


def train(cfg: TrainConfig, model_cfg: ModelConfig, progress: bool = True):
    """Train an adapter and write it to cfg.out; returns (final FitState, trained model, params, basis)."""
    torch.manual_seed(cfg.seed)
    loaded = load_model(model_cfg)
    basis = BasisCache(model_cfg.basis_dir).load_or_compute(
        loaded.model, model_cfg.target_modules, model_cfg.rank_max, method=model_cfg.svd_method,
        kind=cfg.basis_kind, progress=progress, device=loaded.device)
    groups = cfg.target_modules or tuple(basis.groups)
    problems = [f"group {g!r} is not among the target modules {sorted(basis.groups)}" for g in groups if g not in basis.groups]
    problems += [f"rank {cfg.rank} exceeds the basis rank {basis.group_rank(g)} of group {g!r}"
                 for g in groups if g in basis.groups and cfg.rank > basis.group_rank(g)]
    if problems:
        raise ValueError("; ".join(problems))
    examples = load_examples(cfg.data, loaded.tokenizer, cfg.max_length)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    params = attach_trainable(loaded.model, basis, groups, cfg.rank)
    adapter_config = AdapterConfig("pica", cfg.rank, tuple(groups), loaded.name, basis.checksum, cfg.basis_kind)
    state, optimizer_state = None, None
    if cfg.resume_from:
        state, optimizer_state = load_checkpoint(Path(cfg.resume_from), params, loaded.device)
        log.info("resuming from %s at step %d", cfg.resume_from, state.step)

    def checkpoint(state: FitState, optimizer) -> None:
        save_checkpoint(cfg.checkpoints / f"checkpoint-{state.step}", adapter_config, params, optimizer, state, cfg)

    state = fit(loaded.model, params, examples, cfg, pad_id, state, optimizer_state, checkpoint, progress)
    out = Path(cfg.out)
    save_adapter_dir(out, adapter_config, adapter_tensors(params))
    log.info("adapter written to %s (%s, %s)", out / CONFIG_FILE, WEIGHTS_FILE, f"{state.step} steps")
    return state, loaded.model, params, basis
