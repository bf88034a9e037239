"""Loads the base model and tokenizer once, from a local folder, a GGUF file, a hub id, or the demo model."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server.config import ModelConfig
from server.demo_model import DEMO_NAME, ensure_demo_model
from server.gguf_model import SUFFIX as GGUF_SUFFIX
from server.gguf_model import GGUFError, ensure_converted, find_gguf_file

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""`name` or `org/name`: what may name a hub model rather than a folder."""


class ModelNotFoundError(Exception):
    """--model names neither an existing folder or GGUF file nor (by its form) a hub model."""


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
    """The base model's public name: a hub id as given, a local folder by its last component, a GGUF
    file by its name without .gguf (never a path)."""
    if model is None:
        return DEMO_NAME
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        return path.resolve().stem
    return path.resolve().name if path.exists() else model


def check_model_source(model: str | None) -> None:
    """Refuse at once a --model that can only be a local path and is neither a folder nor a GGUF file
    (a typo in a path, which transformers would otherwise report as a malformed hub id), and a folder
    holding several GGUF files."""
    if model is None:
        return
    path = Path(model).expanduser()
    try:
        if find_gguf_file(path) or path.is_dir():
            return
    except GGUFError as exc:
        raise ModelNotFoundError(str(exc)) from None
    if path.exists():
        raise ModelNotFoundError(f"model path {model} is neither a folder (with config.json) nor a {GGUF_SUFFIX} file")
    if not HUB_ID.fullmatch(model):
        raise ModelNotFoundError(f"model folder {model} does not exist")


def model_source(cfg: ModelConfig) -> str:
    """What transformers loads: the folder or hub id given, a GGUF file's converted folder, or the demo model."""
    if cfg.model is None:
        return str(ensure_demo_model(cfg.cache_dir))
    path = Path(cfg.model).expanduser()
    gguf_file = find_gguf_file(path) if path.exists() else None
    if gguf_file is None:
        return str(path)
    try:
        return str(ensure_converted(gguf_file, cfg.cache_dir))
    except GGUFError as exc:
        raise ModelNotFoundError(str(exc)) from None


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load model and tokenizer through transformers' Auto classes (the same path for users and tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    check_model_source(cfg.model)
    source = model_source(cfg)
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
