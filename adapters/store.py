"""The adapter store: every uploaded adapter, on disk, surviving restarts.

Layout: `<root>/<adapter_id>/{adapter_config.json, adapter_model.safetensors, meta.json}`. An upload
is validated fully against this server's base model and basis before anything is written, then
written into a temp folder and renamed into place, so a reader sees a whole adapter or none.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adapters.format import CONFIG_FILE, WEIGHTS_FILE, Adapter, AdapterExpectation, load_adapter_dir, parse_adapter
from cache.atomic import atomic_write

ADAPTER_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
META_FILE = "meta.json"


class AdapterIdError(ValueError):
    pass


def check_adapter_id(adapter_id: str) -> str:
    """Adapter ids are 1-128 of [A-Za-z0-9._-] not starting with '.': never a path trick like '..', and
    never in the store's own name space (`.upload-*` and `.deleted-*` folders are removed at start)."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID_PATTERN.fullmatch(adapter_id):
        raise AdapterIdError(f"invalid adapter id {adapter_id!r}: use 1-128 characters of A-Z a-z 0-9 . _ -, "
                             "not starting with '.'")
    return adapter_id


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    method: str
    r: int
    target_modules: list[str]
    num_params: int
    size_bytes: int
    checksum: str
    created: int
    base_model: str | None


class AdapterStore:
    def __init__(self, root: Path, expect: AdapterExpectation):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.expect = expect
        self._lock = threading.Lock()
        for leftover in self.root.glob(".upload-*"):  # an upload or delete cut short by a crash
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.root.glob(".deleted-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _dir(self, adapter_id: str) -> Path:
        return self.root / check_adapter_id(adapter_id)

    def ids(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).exists()
        )

    def __contains__(self, adapter_id: str) -> bool:
        try:
            return (self._dir(adapter_id) / META_FILE).exists()
        except AdapterIdError:
            return False

    def __len__(self) -> int:
        return len(self.ids())

    def info(self, adapter_id: str) -> AdapterInfo:
        if adapter_id not in self:
            raise KeyError(adapter_id)
        return AdapterInfo(**json.loads((self._dir(adapter_id) / META_FILE).read_text()))

    def load(self, adapter_id: str) -> Adapter:
        """Read and re-validate a stored adapter; KeyError if there is none."""
        if adapter_id not in self:
            raise KeyError(adapter_id)
        return load_adapter_dir(self._dir(adapter_id), self.expect)

    def put(self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes) -> AdapterInfo:
        """Validate, then store atomically. Raises AdapterIdError, AdapterValidationError, FileExistsError."""
        target = self._dir(adapter_id)
        adapter = parse_adapter(config_bytes, weights_bytes, self.expect)
        cfg = adapter.config
        info = AdapterInfo(adapter_id, cfg.method, cfg.r, list(cfg.target_modules), adapter.num_params,
                           len(weights_bytes), adapter.checksum, int(time.time()), cfg.base_model)
        with self._lock:
            if target.exists():
                raise FileExistsError(adapter_id)
            tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
            try:
                atomic_write(tmp / CONFIG_FILE, config_bytes)
                atomic_write(tmp / WEIGHTS_FILE, weights_bytes)
                atomic_write(tmp / META_FILE, json.dumps(asdict(info)).encode())
                tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return info

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter; KeyError if there is none. Renamed away first, so readers never see half."""
        with self._lock:
            if adapter_id not in self:
                raise KeyError(adapter_id)
            trash = Path(tempfile.mkdtemp(prefix=".deleted-", dir=self.root))
            self._dir(adapter_id).rename(trash / adapter_id)
        shutil.rmtree(trash, ignore_errors=True)
