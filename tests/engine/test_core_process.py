"""The engine-core process without HTTP: CoreClient against a spawned core, mixed adapters in one batch,
every request's tokens equal to the dense merged model's greedy tokens; on CUDA (CUDA graphs, the update
sent while the next forward runs) the step stats carry the GPU time; async scheduling on CPU and (by default)
on CUDA."""

import asyncio

import pytest
import torch

from adapters.format import AdapterExpectation
from adapters.store import AdapterStore
from cache.basis_cache import BasisCache
from server.config import AppConfig, EngineConfig, ServerConfig
from server.engine.core_client import AdapterRef, CoreClient
from server.engine.sampling import SamplingParams
from server.model_loader import load_model
from tests.helpers import build_tiny_model, write_random_adapter
from tests.server.conftest import Oracle

CUDA = pytest.param("cuda", None, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                               reason="needs a CUDA device")])


@pytest.mark.parametrize("device,async_scheduling", [("cpu", False), ("cpu", True), CUDA])
def test_core_process_matches_the_dense_oracle(tmp_path, model_config_for, device, async_scheduling):
    model_cfg = model_config_for(build_tiny_model(tmp_path / "m", "llama", seed=5), rank_max=8, device=device,
                                 dtype="float32")
    basis = BasisCache(model_cfg.basis_dir).load_or_compute(load_model(model_cfg).model, model_cfg.target_modules, 8,
                                                            progress=False)
    store = AdapterStore(tmp_path / "adapters", AdapterExpectation.from_basis(basis))
    versions = {f"a{i}": store.provision(f"a{i}", write_random_adapter(tmp_path / f"a{i}", basis, r=3 + i, seed=i))
                .checksum for i in range(3)}
    config = AppConfig(model=model_cfg, engine=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128,
                                                            max_gpu_adapters=2, async_scheduling=async_scheduling),
                       server=ServerConfig(adapter_dir=tmp_path / "adapters", api_key=None, admin_key=None))
    stats = []
    client = CoreClient(config, lambda: load_model(model_cfg).tokenizer, on_stats=stats.append)
    client.start()
    jobs = [(f"r{i}", [None, "a0", "a1", "a2"][i % 4], [3 + (7 * i + j) % 200 for j in range(2 + i % 9)], 4 + i % 7)
            for i in range(12)]

    async def run_all():
        async def one(request_id, adapter_id, prompt, max_tokens):
            ref = AdapterRef(adapter_id, versions[adapter_id]) if adapter_id else None
            stream = client.submit(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                      ignore_eos=True), ref)
            return [t async for out in stream for t in out.token_ids]

        return await asyncio.gather(*(one(*job) for job in jobs))

    try:
        got = asyncio.run(run_all())
    finally:
        client.shutdown()
    assert not client.process.is_alive()
    oracle = Oracle(model_cfg, basis, store)
    for (request_id, adapter_id, prompt, max_tokens), tokens in zip(jobs, got):
        assert tokens == oracle.greedy(adapter_id, prompt, max_tokens), (request_id, adapter_id)
    decode = [s for s in stats if s.batch_size and not s.num_prefill_tokens]
    # on CUDA a lookahead step's idle time before it can be 0 (queued before the step ahead of it ended)
    assert decode and all(s.host_seconds > 0 if device == "cpu" else s.host_seconds >= 0 for s in decode)
    assert all((s.gpu_seconds > 0) == (device == "cuda") for s in decode)


def test_core_reads_stored_adapters_ahead_while_idle(tmp_path, model_config_for):
    """A (re)started core fills its host cache from the store, newest first, before any request; the first
    request for such an adapter is a host hit, not a disk read."""
    import time

    model_cfg = model_config_for(build_tiny_model(tmp_path / "m", "llama", seed=5), rank_max=8, dtype="float32")
    basis = BasisCache(model_cfg.basis_dir).load_or_compute(load_model(model_cfg).model, model_cfg.target_modules, 8,
                                                            progress=False)
    store = AdapterStore(tmp_path / "adapters", AdapterExpectation.from_basis(basis))
    versions = {f"a{i}": store.provision(f"a{i}", write_random_adapter(tmp_path / f"a{i}", basis, r=4, seed=i))
                .checksum for i in range(3)}
    config = AppConfig(model=model_cfg, engine=EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                                                            max_gpu_adapters=2, max_host_adapters=8),
                       server=ServerConfig(adapter_dir=tmp_path / "adapters", api_key=None, admin_key=None))
    client = CoreClient(config, lambda: load_model(model_cfg).tokenizer)
    client.start()
    try:
        deadline = time.monotonic() + 60
        while client.gauges.num_host_adapters < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.gauges.num_host_adapters == 3 and client.gauges.host_hits == 0

        async def one():
            stream = client.submit("r", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                   AdapterRef("a1", versions["a1"]))
            return [t async for out in stream for t in out.token_ids]

        assert len(asyncio.run(one())) == 2
        assert (client.gauges.host_hits, client.gauges.host_misses) == (1, 3)  # the 3 reads ahead, then a hit
    finally:
        client.shutdown()


def test_newest_stored_orders_by_creation_and_stops_at_the_limit():
    from types import SimpleNamespace

    from adapters.store import DamagedAdapterError
    from server.engine.core import newest_stored

    created = {"old": 1, "new": 3, "mid": 2, "bad": 4}

    class Store:
        def ids(self):
            return sorted(created)

        def info(self, adapter_id):
            if adapter_id == "bad":
                raise DamagedAdapterError(adapter_id, "unreadable meta.json")
            return SimpleNamespace(created=created[adapter_id])

    assert newest_stored(Store(), 8) == ["new", "mid", "old"]
    assert newest_stored(Store(), 2) == ["new", "mid"]
