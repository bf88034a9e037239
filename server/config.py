"""Frozen, validated configuration objects, built once at start-up and passed down.

This is the only module that reads environment variables (`PICA_*`); everything else
receives these objects through its constructor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SVD_METHODS = ("gram", "svd")


def default_cache_dir() -> Path:
    """Root for the demo model and the basis cache: $PICA_CACHE_DIR, else ~/.cache/pica-serve."""
    env = os.environ.get("PICA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pica-serve"


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how to build its frozen basis."""

    model: str | None = None
    """Local folder or hub id; None serves the built-in demo model."""
    dtype: str = "auto"
    """auto = bfloat16 on CUDA, float32 on CPU."""
    device: str = "auto"
    """auto = cuda when available, else cpu."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Name suffixes of the nn.Linear modules that adapters may change; each suffix is one group."""
    rank_max: int = 256
    """Columns of U kept per layer (clipped to min(out, in)); adapters may use any r <= this."""
    svd_method: str = "gram"
    """How U is computed: 'gram' (eigendecomposition of the smaller Gram matrix) or 'svd' (full SVD)."""
    cache_dir: Path = field(default_factory=default_cache_dir)

    def __post_init__(self):
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.svd_method not in SVD_METHODS:
            problems.append(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")
        if self.rank_max < 1:
            problems.append(f"rank_max must be >= 1, got {self.rank_max}")
        if not self.target_modules:
            problems.append("target_modules must name at least one module suffix")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def basis_dir(self) -> Path:
        return self.cache_dir / "basis"
