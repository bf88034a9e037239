"""The adapter store: every uploaded adapter, on disk, surviving restarts.

Layout: `<root>/<adapter_id>/{adapter_config.json, adapter_model.safetensors, meta.json}`. An upload
is validated fully against this server's base model and basis before anything is written, then
written into a temp folder and renamed into place, so a reader sees a whole adapter or none.

At start the store adopts adapter folders copied into it (validated, then given their meta.json)
and checks every entry. A damaged entry (meta.json unreadable, weights truncated or invalid) is
logged, kept in `damaged` and left out of listings; asking for it raises DamagedAdapterError.
Nothing is deleted but by `delete`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adapters.format import (CONFIG_FILE, WEIGHTS_FILE, Adapter, AdapterExpectation, AdapterValidationError,
                             load_adapter_dir, parse_adapter)
from cache.atomic import atomic_write

log = logging.getLogger(__name__)

ADAPTER_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
META_FILE = "meta.json"


STALE_TEMP_SECONDS = 900
"""Temp folders (`.upload-*`, `.deleted-*`) older than this are a crash's leftovers and removed at start;
younger ones may belong to another replica sharing the store."""


class AdapterIdError(ValueError):
    pass


class DamagedAdapterError(Exception):
    """A stored adapter whose files cannot be read back; the rest of the store is unaffected."""

    def __init__(self, adapter_id: str, reason: str):
        self.adapter_id, self.reason = adapter_id, reason
        super().__init__(f"adapter {adapter_id!r} is damaged in the store ({reason}); delete it and upload it again")


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
        now = time.time()
        for leftover in [*self.root.glob(".upload-*"), *self.root.glob(".deleted-*")]:
            # an upload or delete cut short by a crash; a recent one may be another replica's, in flight
            if now - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        self.damaged: dict[str, str] = {}
        """adapter_id -> what is wrong with it, for every damaged entry found so far."""
        self._scan()

    def _scan(self) -> None:
        for path in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                check_adapter_id(path.name)
            except AdapterIdError:
                log.warning("store: ignoring folder %s (not a valid adapter id)", path)
                continue
            if (path / META_FILE).exists():
                self._check_entry(path.name)
            else:
                self._adopt(path)

    def _check_entry(self, adapter_id: str) -> None:
        """The cheap checks: meta.json reads, the weights file is there with its recorded size."""
        try:
            info = self.info(adapter_id)
            size = (self._dir(adapter_id) / WEIGHTS_FILE).stat().st_size
        except DamagedAdapterError:
            return
        except OSError as exc:
            self._mark_damaged(adapter_id, f"{WEIGHTS_FILE}: {exc.strerror or exc}")
            return
        if size != info.size_bytes:
            self._mark_damaged(adapter_id, f"{WEIGHTS_FILE} has {size} bytes, {info.size_bytes} were stored")

    def _adopt(self, path: Path) -> None:
        """An adapter folder copied into the store: validated, then made an entry by writing its meta.json."""
        try:
            adapter = load_adapter_dir(path, self.expect)
        except (AdapterValidationError, OSError) as exc:
            self._mark_damaged(path.name, f"copied in but not a valid adapter: {exc}")
            return
        info = self._info_of(path.name, adapter, (path / WEIGHTS_FILE).stat().st_size)
        atomic_write(path / META_FILE, json.dumps(asdict(info)).encode())
        log.info("store: adopted adapter folder %s", path)

    def _mark_damaged(self, adapter_id: str, reason: str) -> None:
        if self.damaged.get(adapter_id) != reason:
            log.error("store: adapter %r is damaged and is skipped: %s", adapter_id, reason)
        self.damaged[adapter_id] = reason

    @staticmethod
    def _info_of(adapter_id: str, adapter: Adapter, size_bytes: int) -> AdapterInfo:
        cfg = adapter.config
        return AdapterInfo(adapter_id, cfg.method, cfg.r, list(cfg.target_modules), adapter.num_params, size_bytes,
                           adapter.checksum, int(time.time()), cfg.base_model)

    def _dir(self, adapter_id: str) -> Path:
        return self.root / check_adapter_id(adapter_id)

    def ids(self) -> list[str]:
        """Stored adapters, less the entries known to be damaged."""
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in self.damaged and (p / META_FILE).exists()
        )

    def __contains__(self, adapter_id: str) -> bool:
        try:
            return (self._dir(adapter_id) / META_FILE).exists()
        except AdapterIdError:
            return False

    def __len__(self) -> int:
        return len(self.ids())

    def _check_known(self, adapter_id: str) -> None:
        if adapter_id in self.damaged:
            raise DamagedAdapterError(adapter_id, self.damaged[adapter_id])
        if adapter_id not in self:
            raise KeyError(adapter_id)

    def info(self, adapter_id: str) -> AdapterInfo:
        """KeyError if there is no such adapter, DamagedAdapterError if its meta.json cannot be read."""
        self._check_known(adapter_id)
        try:
            return AdapterInfo(**json.loads((self._dir(adapter_id) / META_FILE).read_text()))
        except FileNotFoundError:
            raise KeyError(adapter_id) from None  # deleted meanwhile
        except (OSError, ValueError, TypeError, RecursionError) as exc:
            self._mark_damaged(adapter_id, f"{META_FILE} is unreadable: {type(exc).__name__}")
            raise DamagedAdapterError(adapter_id, self.damaged[adapter_id]) from exc

    def load(self, adapter_id: str) -> Adapter:
        """Read and re-validate a stored adapter; KeyError if there is none, DamagedAdapterError if it fails."""
        self._check_known(adapter_id)
        try:
            return load_adapter_dir(self._dir(adapter_id), self.expect)
        except (AdapterValidationError, OSError) as exc:
            if adapter_id not in self:
                raise KeyError(adapter_id) from None  # deleted meanwhile
            self._mark_damaged(adapter_id, str(exc))
            raise DamagedAdapterError(adapter_id, self.damaged[adapter_id]) from exc

    def put(self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes) -> AdapterInfo:
        """Validate, then store atomically. Raises AdapterIdError, AdapterValidationError, FileExistsError."""
        target = self._dir(adapter_id)
        info = self._info_of(adapter_id, parse_adapter(config_bytes, weights_bytes, self.expect), len(weights_bytes))
        with self._lock:
            if target.exists():
                raise FileExistsError(adapter_id)
            tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
            try:
                atomic_write(tmp / CONFIG_FILE, config_bytes)
                atomic_write(tmp / WEIGHTS_FILE, weights_bytes)
                atomic_write(tmp / META_FILE, json.dumps(asdict(info)).encode())
                tmp.rename(target)
            except BaseException as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(exc, OSError) and target.exists():  # another replica stored this id first
                    raise FileExistsError(adapter_id) from exc
                raise
        return info

    def provision(self, adapter_id: str, folder: Path) -> AdapterInfo:
        """Store the adapter in `folder` as `adapter_id` (`--adapter ID=PATH` at start): kept if the store
        already holds these weights, replaced if it holds others."""
        folder = Path(folder)
        missing = [f"missing {name} in {folder}" for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
        if missing:
            raise AdapterValidationError(missing)
        config, weights = (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()
        try:
            stored = self.info(adapter_id)
        except (KeyError, DamagedAdapterError):
            stored = None
        if stored is not None and stored.checksum == hashlib.sha256(weights).hexdigest():
            return stored
        parse_adapter(config, weights, self.expect)  # refuse before replacing anything
        if self._dir(adapter_id).exists():
            log.warning("store: replacing adapter %r with %s", adapter_id, folder)
            self.delete(adapter_id)
        return self.put(adapter_id, config, weights)

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter, damaged ones too; KeyError if there is none. Renamed away first, so readers
        never see half."""
        with self._lock:
            if not self._dir(adapter_id).is_dir():
                raise KeyError(adapter_id)
            trash = Path(tempfile.mkdtemp(prefix=".deleted-", dir=self.root))
            self._dir(adapter_id).rename(trash / adapter_id)
            self.damaged.pop(adapter_id, None)
        shutil.rmtree(trash, ignore_errors=True)
