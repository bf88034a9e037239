"""Loads the base model and tokenizer once, from a local folder, a hub id, or the demo model."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server.config import ModelConfig
from server.demo_model import DEMO_NAME, ensure_demo_model

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""`name` or `org/name`: what may name a hub model rather than a folder."""


class ModelNotFoundError(Exception):
    """--model names neither an existing folder nor (by its form) a hub model."""


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    """The name users see as the base model (`model` field of the OpenAI API)."""
    device: torch.device
    dtype: torch.dtype
    load_seconds: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def served_name(model: str | None) -> str:
    """The base model's public name: a hub id as given, a local folder by its last component (never a path)."""
    if model is None:
        return DEMO_NAME
    path = Path(model)
    return path.resolve().name if path.exists() else model


def check_model_source(model: str | None) -> None:
    """Refuse at once a --model that can only be a local path and is not a folder (a typo in a path,
    which transformers would otherwise report as a malformed hub id)."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelNotFoundError(f"model path {model} is not a folder (a model is a folder with config.json)")
    if not HUB_ID.fullmatch(model):
        raise ModelNotFoundError(f"model folder {model} does not exist")


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load model and tokenizer through transformers' Auto classes (the same path for users and tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    check_model_source(cfg.model)
    source = str(Path(cfg.model).expanduser()) if cfg.model else str(ensure_demo_model(cfg.cache_dir))
    name = served_name(cfg.model)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        if Path(source).is_dir():
            raise
        raise ModelNotFoundError(f"model {cfg.model} is neither a local folder nor a hub model this machine can "
                                 f"load: {exc}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    seconds = time.perf_counter() - start
    log.info("loaded %s on %s as %s in %.1fs", name, device, dtype, seconds)
    return LoadedModel(model, tokenizer, name, device, dtype, seconds)
