"""What an engine serves from, loaded once where the engine runs (the HTTP process, or the engine core's):
the model, its basis (from the cache, computed if missing), the adapter store that validates against both,
and the host-RAM adapter cache above it."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.format import AdapterExpectation
from adapters.store import AdapterStore
from cache.basis_cache import Basis, BasisCache
from cache.host_cache import HostCache
from cache.svd_factors import svd_factors_of
from server.config import AppConfig
from server.model_loader import LoadedModel, load_model


@dataclass
class Served:
    loaded: LoadedModel
    basis: Basis
    store: AdapterStore
    host_cache: HostCache


def load_served(config: AppConfig) -> Served:
    loaded = load_model(config.model)
    basis = BasisCache(config.model.basis_dir).load_or_compute(
        loaded.model, config.model.target_modules, config.model.rank_max, method=config.model.svd_method,
        device=loaded.device, dtype=loaded.dtype,
    )
    # the SVD factors (PSOFT) read the target linears as loaded, before the engine wraps them
    expect = AdapterExpectation.from_basis(basis, config.engine.max_lora_rank, svd_factors_of(loaded.model, basis),
                                           config.engine.max_psoft_rank)
    store = AdapterStore(config.adapter_dir, expect)
    host_cache = HostCache(store.load, config.engine.max_host_adapters, loaded.dtype, loaded.device.type == "cuda")
    return Served(loaded, basis, store, host_cache)
