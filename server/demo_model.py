"""The built-in demo model: a tiny Llama with random weights and a byte-level tokenizer made locally.

It lets `pica-serve serve` run on a fresh machine with no model download. It is built
deterministically (fixed seed) on first use and kept in the cache dir.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cache.atomic import build_folder_once

log = logging.getLogger(__name__)

DEMO_NAME = "pica-demo-tiny-llama"
_DEMO_VERSION = "2"  # 2: the byte vocabulary no longer depends on the process
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token, plus <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # alphabet() comes back in a different order in every process: sort it, or the vocabulary changes
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def tiny_config(tokenizer, config_class=None, **overrides):
    """A small causal-LM config around the byte tokenizer (the demo model's; tests shrink it further)."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return (config_class or LlamaConfig)(**{**fields, **overrides})


def build_demo_model(out_dir: Path, seed: int = 0) -> Path:
    """Write the demo model + tokenizer to out_dir with save_pretrained."""
    from transformers import LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    config = tiny_config(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_demo_model(cache_dir: Path) -> Path:
    """Path of the demo model folder, building it atomically on first use."""
    target = Path(cache_dir) / "models" / f"{DEMO_NAME}-v{_DEMO_VERSION}"
    if not (target / "config.json").exists():
        log.info("building the demo model in %s", target)
    return build_folder_once(target, build_demo_model)
