"""The converted SmolLM2 folder: special tokens from the GGUF metadata, no quantization config left."""

import json

import pytest

from server.gguf_model import metadata_special_ids
from server.model_loader import load_model

pytestmark = pytest.mark.real


def test_converted_folder_takes_special_tokens_from_the_gguf_metadata(real_cfg, gguf_file, real_cache):
    (folder,) = (real_cache / "models").iterdir()
    assert json.loads((folder / "config.json").read_text()).get("quantization_config") is None
    ids = metadata_special_ids(gguf_file)
    assert ids["eos_token_id"] == 2 and ids["bos_token_id"] == 1
    loaded = load_model(real_cfg)
    tokenizer = loaded.tokenizer
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)  # transformers alone says <|im_start|>
    assert tokenizer.bos_token_id == 1 and tokenizer.pad_token_id == ids["padding_token_id"]
    assert loaded.model.config.eos_token_id == loaded.model.generation_config.eos_token_id == 2
    assert loaded.name == "SmolLM2-135M-Instruct.Q4_1"
    assert list((real_cache / "models").iterdir()) == [folder], "later loads read the folder"
