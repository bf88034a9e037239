import logging

import pytest
import torch

from server.config import ModelConfig
from server.http.app import build_app
from tests.helpers import app_config, build_tiny_model
from tests.server.live import LiveServer

torch.set_num_threads(2)


@pytest.fixture
def model_config_for(tmp_path):
    """ModelConfig for a model folder, with the basis cache inside the test's temp dir."""

    def make(model_dir, rank_max=16, **kw):
        return ModelConfig(model=str(model_dir), device="cpu", rank_max=rank_max, cache_dir=tmp_path / "cache", **kw)

    return make


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="module")
def server_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    build_tiny_model(root / "model", "llama", seed=3)
    return root


@pytest.fixture(scope="module")
def live(server_root):
    with LiveServer(build_app(app_config(server_root))) as server:
        yield server
