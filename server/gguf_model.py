"""GGUF models: a .gguf file converted once into a plain transformers folder in the cache dir.

transformers reads GGUF (with the optional `gguf` and `accelerate` packages) but dequantizes every
tensor on each load, and its tokenizer conversion gets some special tokens wrong (SmolLM2 comes out
with `eos_token` `<|im_start|>` although the file says `<|im_end|>`). So the file is converted once,
with the special tokens taken from the GGUF metadata, into `<cache>/models/gguf-<sha256>/`; later
starts load that folder like any other model.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from cache.atomic import build_folder_once

log = logging.getLogger(__name__)
SUFFIX = ".gguf"
CONVERSION_VERSION = "1"
"""Part of the folder name: bump it when the conversion changes, so old folders are not reused."""
SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                  "pad_token": "padding_token_id"}
"""Tokenizer attribute -> its id's key in the GGUF metadata (`tokenizer.ggml.<key>`)."""


class GGUFError(Exception):
    """A GGUF source that cannot be used: several files in one folder, or the optional packages missing."""


def find_gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a folder without config.json.

    None when `path` is not a GGUF source (a transformers folder, or anything else)."""
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(files) > 1:
        raise GGUFError(f"{path} holds {len(files)} .gguf files ({', '.join(p.name for p in files)}): "
                        "name the one to load")
    return files[0] if files else None


def file_sha256(path: Path, progress: bool = True) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"hashing {path.name}", disable=not progress) as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def metadata_special_ids(gguf_file: Path) -> dict[str, int]:
    """`tokenizer.ggml.<key>` ids of the special tokens the file declares (keys of SPECIAL_TOKENS' values)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    ids = {}
    for key in SPECIAL_TOKENS.values():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            ids[key] = int(field.contents())
    return ids


def apply_special_tokens(tokenizer, model, ids: dict[str, int]) -> None:
    """Set the tokenizer's special tokens, and the model's and generation config's ids, from the metadata."""
    for attr, key in SPECIAL_TOKENS.items():
        if key not in ids:
            continue
        setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(ids[key]))
        if attr != "unk_token":
            for config in (model.config, model.generation_config):
                setattr(config, attr + "_id", ids[key])


def convert(gguf_file: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantize the file (float32) and save model + tokenizer with save_pretrained into out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf_file.parent), gguf_file.name
    with tqdm(total=3, desc=f"converting {name}", unit="stage", disable=not progress) as bar:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        tokenizer.clean_up_tokenization_spaces = False  # byte-level BPE: the clean-up would eat spaces
        bar.update(1)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
        bar.update(1)
        apply_special_tokens(tokenizer, model, metadata_special_ids(gguf_file))
        # the weights are dequantized now: a quantization config left behind makes save_pretrained refuse
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        bar.update(1)


def ensure_converted(gguf_file: Path, cache_dir: Path, progress: bool = True) -> Path:
    """The converted folder of a GGUF file, keyed by the file's sha256; converted atomically on first use."""
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading needs both)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise GGUFError(f"loading {gguf_file.name} needs the optional GGUF packages: "
                        f"pip install 'pica-serve[gguf]' ({exc})") from None
    target = Path(cache_dir) / "models" / f"gguf-{file_sha256(gguf_file, progress)}-v{CONVERSION_VERSION}"
    if not (target / "config.json").exists():
        log.info("converting %s into %s (once; later starts load the folder)", gguf_file, target)
    return build_folder_once(target, lambda folder: convert(gguf_file, folder, progress))
