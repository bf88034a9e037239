import pytest
import torch

from adapters.merge import merge_adapter
from server.config import AppConfig, EngineConfig, ModelConfig, ServerConfig
from server.http.app import build_app
from server.model_loader import load_model
from tests.helpers import build_tiny_model
from tests.server.live import LiveServer


def app_config(root, **server_kw) -> AppConfig:
    return AppConfig(
        model=ModelConfig(model=str(root / "model"), device="cpu", rank_max=8, cache_dir=root / "cache"),
        engine=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, max_gpu_adapters=2),
        server=ServerConfig(**{"adapter_dir": root / "adapters", "api_key": None, "admin_key": None, **server_kw}),
    )


@pytest.fixture(scope="module")
def server_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    build_tiny_model(root / "model", "llama", seed=3)
    return root


@pytest.fixture(scope="module")
def live(server_root):
    with LiveServer(build_app(app_config(server_root))) as server:
        yield server


class Oracle:
    """Greedy one-request-at-a-time generation on the dense merged model (plain transformers)."""

    def __init__(self, cfg, basis, store):
        self.cfg, self.basis, self.store = cfg, basis, store

    @torch.no_grad()
    def greedy(self, adapter_id, prompt_ids, max_tokens):
        model = load_model(self.cfg).model
        if adapter_id is not None:
            merge_adapter(model, self.basis, self.store.load(adapter_id))
        ids = list(prompt_ids)
        for _ in range(max_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt_ids) :]


@pytest.fixture(scope="module")
def oracle(live):
    state = live.state
    return Oracle(state.config.model, state.basis, state.store)
