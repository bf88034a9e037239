"""Loads the base model and tokenizer once, from a local folder, a hub id, or the demo model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server.config import ModelConfig
from server.demo_model import DEMO_NAME, ensure_demo_model

log = logging.getLogger(__name__)


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


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load model and tokenizer through transformers' Auto classes (the same path for users and tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    source = cfg.model or str(ensure_demo_model(cfg.cache_dir))
    name = served_name(cfg.model)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(device).eval()
    model.requires_grad_(False)
    seconds = time.perf_counter() - start
    log.info("loaded %s on %s as %s in %.1fs", name, device, dtype, seconds)
    return LoadedModel(model, tokenizer, name, device, dtype, seconds)
