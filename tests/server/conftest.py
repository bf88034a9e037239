import pytest
import torch

from adapters.merge import merge_adapter
from server.model_loader import load_model


class Oracle:
    """Greedy one-request-at-a-time generation on the dense merged model (plain transformers)."""

    def __init__(self, cfg, basis, store):
        self.cfg, self.basis, self.store = cfg, basis, store

    @torch.no_grad()
    def greedy(self, adapter_id, prompt_ids, max_tokens):
        model = load_model(self.cfg).model
        if adapter_id is not None:
            merge_adapter(model, self.basis, self.store.load(adapter_id))
        ids, device = list(prompt_ids), next(model.parameters()).device
        for _ in range(max_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].argmax()))
        return ids[len(prompt_ids) :]


@pytest.fixture(scope="module")
def oracle(live):
    state = live.state
    return Oracle(state.config.model, state.basis, state.store)
