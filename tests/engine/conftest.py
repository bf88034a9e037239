import pytest
import torch

from adapters.merge import merge_adapter
from cache.basis_cache import BasisCache
from cache.host_cache import HostCache
from server.config import EngineConfig
from server.engine.engine import Engine
from server.model_loader import load_model
from tests.helpers import build_tiny_model, make_adapter


class World:
    """A tiny model, its basis, N adapters and a greedy reference on the dense merged models."""

    def __init__(self, tmp_path, model_config_for, num_adapters, arch="llama", **model_kw):
        self.cfg = model_config_for(build_tiny_model(tmp_path / "m", arch), rank_max=8, **model_kw)
        self.loaded = load_model(self.cfg)
        self.basis = BasisCache(self.cfg.basis_dir).load_or_compute(
            self.loaded.model, self.cfg.target_modules, 8, progress=False
        )
        self.adapters = {f"a{i}": make_adapter(tmp_path, self.basis, r=4 + i % 5, seed=i, signs=i % 3 == 2)
                         for i in range(num_adapters)}
        self.host = HostCache(self.adapters.__getitem__, 64, torch.float32, pin_memory=False)
        self._references = {}

    def engine(self, **overrides) -> Engine:
        cfg = dict(max_num_seqs=8, max_num_batched_tokens=32, max_gpu_adapters=4, max_model_len=128)
        cfg.update(overrides)
        return Engine(load_model(self.cfg), self.basis, EngineConfig(**cfg))

    def handle(self, adapter_id):
        return None if adapter_id is None else self.host.get(adapter_id)

    def reference_model(self, adapter_id):
        if adapter_id not in self._references:
            model = load_model(self.cfg).model
            if adapter_id is not None:
                merge_adapter(model, self.basis, self.adapters[adapter_id])
            self._references[adapter_id] = model
        return self._references[adapter_id]

    @torch.no_grad()
    def greedy(self, adapter_id, prompt, max_tokens):
        """One request alone on the dense merged model, full recompute each token (plain transformers)."""
        model = self.reference_model(adapter_id)
        ids = list(prompt)
        for _ in range(max_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].argmax()))
        return ids[len(prompt) :]


def run_to_completion(engine, max_steps=10_000, before_step=None):
    """Step until the engine drains; before_step(i), where given, runs before step i (arrivals mid-run)."""
    tokens, finish, stats = {}, {}, []
    for i in range(max_steps):
        if before_step is not None:
            before_step(i)
        if not engine.has_work:
            break
        outputs, step_stats = engine.step()
        stats.append(step_stats)
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                finish[out.request_id] = out.finish_reason
    assert not engine.has_work, "engine did not drain"
    return tokens, finish, stats


@pytest.fixture
def world_factory(tmp_path, model_config_for):
    return lambda num_adapters=3, arch="llama", **model_kw: World(tmp_path, model_config_for, num_adapters, arch, **model_kw)
