import logging

import pytest
import torch

from server.config import ModelConfig
from tests.helpers import build_tiny_model

torch.set_num_threads(2)


@pytest.fixture
def model_config_for(tmp_path):
    """ModelConfig for a model folder, with the basis cache inside the test's temp dir."""

    def make(model_dir, rank_max=16, **kw):
        kw.setdefault("device", "cpu")
        return ModelConfig(model=str(model_dir), rank_max=rank_max, cache_dir=tmp_path / "cache", **kw)

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
    from server.http.app import build_app  # imported here: GPU-only test runs need no HTTP stack
    from tests.helpers import app_config
    from tests.server.live import LiveServer

    with LiveServer(build_app(app_config(server_root))) as server:
        yield server


@pytest.fixture(scope="module")
def good_files(live):
    """A valid upload for the live server: its two files' bytes."""
    import json

    from safetensors.torch import save as st_save

    from tests.helpers import random_adapter_tensors

    basis = live.state.basis
    config = {"method": "pica", "r": 4, "target_modules": sorted(basis.groups), "basis_checksum": basis.checksum}
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": st_save(random_adapter_tensors(basis, 4))}
