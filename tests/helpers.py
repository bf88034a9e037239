"""Tiny random models and adapters built inside the tests (nothing is downloaded)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import sys
from pathlib import Path

import torch

from adapters.format import AdapterConfig, AdapterExpectation, load_adapter_dir, save_adapter_dir
from server.config import AppConfig, EngineConfig, ModelConfig, ServerConfig
from server.demo_model import build_byte_tokenizer, tiny_config

ARCHS = ("llama", "qwen2")


def build_tiny_model(path: Path, arch: str = "llama", seed: int = 0, num_layers: int = 2,
                     init_std: float = 0.02) -> Path:
    """Save a random tiny causal LM + byte tokenizer with save_pretrained; out != in for the MLP.

    init_std 0.02 (transformers' default) gives near-uniform outputs whose logit spread a frozen
    lm_head caps; training tests use a larger one so that confident answers are reachable."""
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    tokenizer = build_byte_tokenizer()
    config_class, extra = {  # Mistral with a window short enough for the tests' prompts; Gemma: transformers' forward
        "llama": (LlamaConfig, {}), "qwen2": (Qwen2Config, {}), "mistral": (MistralConfig, {"sliding_window": 8}),
        "gemma": (GemmaConfig, {"head_dim": 16}),
    }[arch]
    config = tiny_config(tokenizer, config_class, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                         max_position_embeddings=512, initializer_range=init_std, **extra)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        if arch == "qwen2":  # make the q/k/v biases non-trivial
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.data.normal_(0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def random_adapter_tensors(basis, r: int, groups=None, seed: int = 0, scale: float = 0.5, signs: bool = False) -> dict:
    """M.<group> for each group; with signs, random per-layer signs.<group> too (an imported adapter's form)."""
    gen = torch.Generator().manual_seed(seed)
    groups = groups or sorted(basis.groups)
    tensors = {
        f"M.{g}": torch.randn(basis.groups[g].out_features, r, generator=gen) * scale / r**0.5
        for g in groups
    }
    if signs:
        tensors.update({f"signs.{g}": torch.randint(0, 2, (len(basis.groups[g].layers), r), generator=gen) * 2.0 - 1
                        for g in groups})
    return tensors


def write_random_adapter(path: Path, basis, r: int, groups=None, seed: int = 0, scale: float = 0.5,
                         signs: bool = False) -> Path:
    groups = groups or sorted(basis.groups)
    config = AdapterConfig("pica", r, tuple(groups), "tiny", basis.checksum)
    save_adapter_dir(path, config, random_adapter_tensors(basis, r, groups, seed, scale, signs))
    return Path(path)


def make_adapter(tmp_path: Path, basis, r: int, seed: int = 0, groups=None, scale: float = 0.5, signs: bool = False):
    folder = write_random_adapter(tmp_path / f"adapter-{seed}-{r}", basis, r, groups, seed, scale, signs)
    return load_adapter_dir(folder, AdapterExpectation.from_basis(basis))


def tar_gz(members: dict, symlink: str | None = None) -> bytes:
    """A .tar.gz of name -> bytes, plus (with symlink) a member of that name linking to /etc/passwd."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def app_config(root, **server_kw) -> AppConfig:
    return AppConfig(
        model=ModelConfig(model=str(root / "model"), device="cpu", rank_max=8, cache_dir=root / "cache"),
        engine=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, max_gpu_adapters=2),
        server=ServerConfig(**{"adapter_dir": root / "adapters", "api_key": None, "admin_key": None, **server_kw}),
    )


def run_kernel_check(script: Path, expect: str) -> None:
    """Run a Triton kernel check script: natively on a GPU, else in Triton's interpreter (which must be
    chosen before the kernel module is imported, hence a subprocess)."""
    import pytest
    import torch

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert expect in result.stdout


def save_peft_adapter(model_dir: Path, out: Path, peft_config, seed: int = 0):
    """Build an adapter with PEFT itself on the tiny model, give its factors random values (PEFT's inits leave
    the delta zero), save it with save_pretrained; returns the PeftModel (the oracle) and `out`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_config)
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.3 if "lora_A" in name else 0.5)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model, Path(out)
