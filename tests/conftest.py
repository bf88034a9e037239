import logging

import pytest
import torch

from server.config import ModelConfig

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
