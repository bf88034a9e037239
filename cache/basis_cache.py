"""On-disk cache of the frozen per-layer bases, so a restart loads P instead of recomputing SVDs.

Layout: `<basis_dir>/<entry key>/basis.safetensors` (one float32 tensor `P.<module>` [rank, in]:
the top right singular vectors of that target linear, as rows) plus `manifest.json`. Format 3 is
the first to hold P; entries of older formats (which held the transposed U) are never read, only
recomputed. `basis_checksum` identifies the basis by what defines it:
a fingerprint of the model's linear weights and the basis kind. It does not depend on which
modules are targeted (each layer's P depends only on its own weight), so an adapter trained on
q_proj alone carries the same checksum as a server targeting every projection; it is the same on
every machine, and adapters naming another one are refused. The entry key adds the targets. The manifest also holds a checksum of every tensor, verified on load (on the device the
basis is loaded to, so a GPU server checks 1.4 GB in milliseconds), so a corrupt or truncated file
is detected, logged and recomputed, never trusted. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from torch import nn
from tqdm import tqdm

from adapters.targets import GroupInfo, find_target_linears, group_targets
from cache.atomic import atomic_write
from cache.basis import principal_basis, random_basis

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
_FINGERPRINT_ROWS = 64


@dataclass(frozen=True)
class Basis:
    """The frozen basis of every target linear, sliced to `rank_max` columns (float32, CPU)."""

    checksum: str
    kind: str
    rank_max: int
    groups: dict[str, GroupInfo]
    p: dict[str, torch.Tensor]
    """Full module name -> P [min(rank_max, out, in), in]."""
    source: str
    """'loaded' or 'computed'."""
    seconds: float

    def group_rank(self, group: str) -> int:
        """Largest adapter r the basis supports for a group."""
        return min(self.rank_max, self.groups[group].max_rank)


def basis_checksum(model: nn.Module, kind: str) -> str:
    """Identity of a basis: sampled rows of every linear weight (bf16-rounded, so the load dtype does
    not matter), with names and shapes, and the basis kind."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "kind": kind}).encode())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in sorted(linears):
        weight = linears[name].weight.detach()
        rows = torch.linspace(0, weight.shape[0] - 1, min(_FINGERPRINT_ROWS, weight.shape[0])).long()
        sample = weight[rows.to(weight.device)].to(torch.bfloat16).to(torch.float32).cpu()
        h.update(f"{name}:{tuple(weight.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def entry_key(checksum: str, target_modules: tuple[str, ...]) -> str:
    return hashlib.sha256(f"{checksum}:{','.join(sorted(target_modules))}".encode()).hexdigest()[:32]


def tensor_checksum(t: torch.Tensor) -> int:
    """Position-weighted sum of a tensor's bits in int64 arithmetic: exact, and the same on CPU and
    GPU (wrap-around addition does not depend on the reduction order)."""
    bits = t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16).reshape(-1).to(torch.int64)
    weights = torch.arange(bits.numel(), device=t.device, dtype=torch.int64) % 65521 + 1
    return int((bits * weights).sum())


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


class BasisCache:
    """Loads the basis of a model from disk, or computes and stores it."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry_dir(self, checksum: str, target_modules: tuple[str, ...]) -> Path:
        return self.root / entry_key(checksum, target_modules)

    def load_or_compute(
        self,
        model: nn.Module,
        target_modules: tuple[str, ...],
        rank_max: int,
        method: str = "gram",
        kind: str = "principal",
        progress: bool = True,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Basis:
        """The basis for `model` on `device`, from the cache when a valid entry holds >= rank_max columns.

        kind is 'principal' (top singular vectors) or 'random:<seed>' (random orthonormal, for ablations).
        The canonical basis is float32; a server asking for another dtype (its model's) gets a serving
        copy in that dtype, written once next to it: half the bytes to read at every later start.
        """
        start = time.perf_counter()
        linears = find_target_linears(model, target_modules)
        groups = group_targets(linears, target_modules)
        checksum = basis_checksum(model, kind)
        ranks = {name: min(rank_max, lin.out_features, lin.in_features) for name, lin in linears.items()}
        entry = self.entry_dir(checksum, target_modules)
        device = torch.device(device)
        source = "loaded"
        p = self._try_load(entry, checksum, ranks, device, dtype) if dtype != torch.float32 else None
        if p is None:
            p = self._try_load(entry, checksum, ranks, device)
            if p is None:
                p = self._compute(linears, ranks, method, kind, progress, device)
                self._store(entry, checksum, kind, method, rank_max, target_modules, p, time.perf_counter() - start)
                source = "computed"
            if dtype != torch.float32:
                p = {name: t.to(dtype) for name, t in p.items()}
                self._store_copy(entry, p, dtype)
        seconds = time.perf_counter() - start
        log.info("basis %s %s in %.2fs (%d modules, rank_max %d)", checksum[:12], source, seconds, len(p), rank_max)
        return Basis(checksum, kind, rank_max, groups, p, source, seconds)

    def _try_load(self, entry: Path, checksum: str, ranks: dict[str, int], device: torch.device,
                  dtype: torch.dtype = torch.float32):
        manifest_path, tensor_path = entry / "manifest.json", entry / _tensor_file(dtype)
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != FORMAT_VERSION or manifest.get("basis_checksum") != checksum or \
                    set(manifest.get("modules", {})) != set(ranks):
                raise ValueError("manifest does not match this model's basis")
            if dtype != torch.float32:
                manifest = manifest.get("copies", {}).get(str(dtype).removeprefix("torch."))
                if manifest is None:
                    return None  # no serving copy yet: the float32 file is read and the copy written
            stored = manifest["modules"]
            short = [n for n, r in ranks.items() if n not in stored or stored[n][0] < r]
            if short:
                log.info("basis cache holds fewer columns than asked for (%s...); recomputing", short[0])
                return None
            p = {}
            with safe_open(tensor_path, framework="pt", device=str(device)) as f:  # mmap, no full read
                for name, rank in ranks.items():
                    t = f.get_tensor(f"P.{name}")
                    if list(t.shape) != stored[name] or tensor_checksum(t) != manifest["tensor_checksums"][name]:
                        raise ValueError(f"checksum mismatch for {name} (corrupt or truncated file)")
                    p[name] = t[:rank].contiguous() if rank < t.shape[0] else t
            return p
        except Exception as exc:  # any damage means recompute, never trust, never crash
            log.warning("basis cache entry %s (%s) is unusable (%s); rebuilding it", entry, tensor_path.name, exc)
            return None

    @staticmethod
    @torch.no_grad()
    def _compute(linears, ranks, method, kind, progress, device) -> dict[str, torch.Tensor]:
        p = {}
        for name in tqdm(sorted(linears), desc="computing basis", unit="layer", disable=not progress):
            weight = linears[name].weight
            if kind == "principal":
                p[name] = principal_basis(weight, ranks[name], method).to(device)
            elif kind.startswith("random:"):
                p[name] = random_basis(weight.shape[1], ranks[name], _module_seed(int(kind[7:]), name)).to(device)
            else:
                raise ValueError(f"unknown basis kind {kind!r}")
        return p

    def _store(self, entry, checksum, kind, method, rank_max, target_modules, p, seconds) -> None:
        if entry.is_file() or entry.is_symlink():
            entry.unlink()
        entry.mkdir(parents=True, exist_ok=True)
        for name in ("basis.safetensors", "manifest.json"):
            _clear_way(entry / name)
        data = save_safetensors_bytes({f"P.{name}": t.cpu() for name, t in p.items()})
        atomic_write(entry / "basis.safetensors", data)
        manifest = {
            "format": FORMAT_VERSION,
            "basis_checksum": checksum,
            "kind": kind,
            "method": method,
            "rank_max": rank_max,
            "target_modules": list(target_modules),
            "modules": {name: list(t.shape) for name, t in p.items()},
            "tensor_checksums": {name: tensor_checksum(t) for name, t in p.items()},
            "compute_seconds": round(seconds, 3),
        }
        atomic_write(entry / "manifest.json", json.dumps(manifest, indent=1).encode())

    def _store_copy(self, entry: Path, p: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Write the serving copy in `dtype`, then record it in the manifest (both atomically)."""
        _clear_way(entry / _tensor_file(dtype))
        atomic_write(entry / _tensor_file(dtype), save_safetensors_bytes({f"P.{n}": t.cpu() for n, t in p.items()}))
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest.setdefault("copies", {})[str(dtype).removeprefix("torch.")] = {
            "modules": {name: list(t.shape) for name, t in p.items()},
            "tensor_checksums": {name: tensor_checksum(t) for name, t in p.items()},
        }
        atomic_write(entry / "manifest.json", json.dumps(manifest, indent=1).encode())


def _clear_way(path: Path) -> None:
    """Remove what stands at `path` where a plain file is to go (a folder, a link), so a rebuild can
    write it: damage of that kind must not stop every later start."""
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _tensor_file(dtype: torch.dtype) -> str:
    return "basis.safetensors" if dtype == torch.float32 else f"basis.{str(dtype).removeprefix('torch.')}.safetensors"
