"""The adapter folder format (PEFT-style) and its validation.

A folder holds `adapter_config.json` and `adapter_model.safetensors`. Validation runs against
what this server serves (its groups, basis ranks and basis checksum) and reports every problem
at once. Only safetensors is read: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from adapters.registry import get_method, method_for_peft_type, method_names, peft_types
from adapters.targets import GroupInfo

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KNOWN_KEYS = ("method", "r", "target_modules", "base_model", "basis_checksum", "basis_kind", "format_version")
FORMAT_VERSION = 2
"""2: PiCa holds `M.<group>` [out_features, r] (W0 + M P). 1 held the transposed `B.<group>` [r, in_features]."""


class AdapterValidationError(ValueError):
    """Everything wrong with an adapter, as a list of human-readable problems."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid adapter: " + "; ".join(problems))


@dataclass(frozen=True)
class AdapterConfig:
    method: str
    r: int
    target_modules: tuple[str, ...]
    base_model: str | None = None
    """Informational only."""
    basis_checksum: str | None = None
    """The basis the adapter was trained against; refused when it is not this server's."""
    basis_kind: str = "principal"
    """'principal', or 'random:<seed>' for the random-basis ablation."""
    layer_ranks: dict[str, int] = field(default_factory=dict, compare=False)
    """Methods with per-layer factors (LoRA): full module name -> that layer's rank (r is their max)."""
    layer_scaling: dict[str, float] = field(default_factory=dict, compare=False)
    """Methods with per-layer factors (LoRA): full module name -> the delta's scale (alpha / r, ...)."""
    peft_options: dict = field(default_factory=dict, compare=False)
    """A PEFT folder's settings the method reads when it resolves the layers against the tensors."""

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "r": self.r,
            "target_modules": list(self.target_modules),
            "base_model": self.base_model,
            "basis_checksum": self.basis_checksum,
            "basis_kind": self.basis_kind,
            "format_version": FORMAT_VERSION,
        }


@dataclass(frozen=True)
class AdapterExpectation:
    """What this server accepts: its groups, the max r per group, and its basis identity."""

    groups: dict[str, GroupInfo]
    group_rank: dict[str, int]
    basis_checksum: str
    basis_kind: str = "principal"
    max_layer_rank: int = 0
    """Largest rank of the per-layer slot stacks (LoRA's A and B, `--max-lora-rank`); 0: none are held."""
    svd_factors: object = field(default=None, compare=False)
    """cache.svd_factors.SvdFactors of the base model's target linears, for PSOFT (None: PSOFT is refused)."""
    max_core_rank: int = 0
    """Rank of the core stacks between frozen factors (PSOFT's K, `--max-psoft-rank`); 0: none are held."""
    slot_served: bool = True
    """False where adapters are merged or exported rather than served from slot stacks: then no stack bounds
    a rank, and PSOFT's factors need not lie in the basis."""
    base_weights: dict = field(default=None, compare=False)
    """Full module name -> the base model's target weight [out, in], given by `pica-serve merge`, which writes
    separate models (CERSA) out and checks their files against these weights; None (a server): they are refused."""

    @classmethod
    def from_basis(cls, basis, max_layer_rank: int = 0, svd_factors=None, max_core_rank: int = 0,
                   slot_served: bool = True, base_weights=None) -> "AdapterExpectation":
        return cls(basis.groups, {g: basis.group_rank(g) for g in basis.groups}, basis.checksum, basis.kind,
                   max_layer_rank, svd_factors, max_core_rank, slot_served, base_weights)

    @property
    def max_weights_bytes(self) -> int:
        """An upper bound on any weights file this server accepts (every group at its largest rank in
        float32, plus room for the header), so an oversized upload is refused before it is read."""
        return 4 * max(get_method(m).max_elements(self) for m in method_names()) + 2**20


@dataclass(frozen=True)
class Adapter:
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    checksum: str
    """sha256 of the safetensors bytes."""
    warnings: tuple[str, ...] = field(default=())

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """What one GPU slot holds for this adapter (PiCa: M [out, r] per group, and its signs if any)."""
        return get_method(self.config.method).slot_tensors_for(self)


def served_method_names() -> list[str]:
    """The methods a server serves beside its base model (all but the separate-model ones)."""
    return [m for m in method_names() if not get_method(m).separate_model]


def separate_model_named(raw) -> str | None:
    """The separate-model method (CERSA) a parsed adapter_config.json names as its `method` or `peft_type`, or
    None."""
    named = raw.get("method", raw.get("peft_type")) if isinstance(raw, dict) else None
    if not isinstance(named, str) or named.lower() not in method_names():
        return None
    return named.lower() if get_method(named.lower()).separate_model else None


def separate_model_refusal(config_bytes: bytes) -> str | None:
    """Why a server refuses this adapter_config.json outright (it names a separate-model method), or None; lets
    an upload too large for any adapter still be told what to do with it."""
    try:
        named = separate_model_named(json.loads(config_bytes))
    except (ValueError, RecursionError):
        return None
    return None if named is None else get_method(named).separate_model_reason()



def check_target_modules(targets, groups) -> tuple[list[str], list[str] | None]:
    """Problems with a config's target_modules (a non-empty list of distinct target groups of this base model),
    and the list itself where it is a list of strings (None otherwise)."""
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        shown = repr(targets)
        shown = shown if len(shown) <= 80 else f"{shown[:80]}... ({len(shown) - 80} more characters)"
        return [f"target_modules must be a non-empty list of strings, got {shown}"], None
    problems = []
    repeated = sorted(t for t, n in Counter(targets).items() if n > 1)
    if repeated:
        problems.append(f"target_modules lists {repeated} more than once")
    unknown = [t for t in targets if t not in groups]
    if unknown:
        problems.append(f"target_modules {unknown[:8]} are not target groups of this base model (they are "
                        f"{sorted(groups)})")
    return problems, targets

def _parse_config(config_bytes: bytes, expect: AdapterExpectation, problems: list[str], warnings: list[str]):
    try:
        raw = json.loads(config_bytes)
    except RecursionError:
        problems.append(f"{CONFIG_FILE} nests too deeply to be an adapter config")
        return None
    except ValueError as exc:  # also undecodable bytes and numbers of thousands of digits
        problems.append(f"{CONFIG_FILE} is not valid JSON: {exc}")
        return None
    if not isinstance(raw, dict):
        problems.append(f"{CONFIG_FILE} must be a JSON object")
        return None
    named = separate_model_named(raw)
    if named is not None and expect.base_weights is None:
        problems.append(get_method(named).separate_model_reason())
        return None
    if named is not None and "method" not in raw:
        problems.append(f"peft_type {str(raw['peft_type'])[:40]!r} names no PEFT folder format: a {named} folder says "
                        f'"method": "{named}" in this server\'s own format (README)')
        return None
    if named is not None:
        return get_method(named).parse_config(raw, expect, problems, warnings)
    if "peft_type" in raw and "method" not in raw:  # a folder as PEFT's save_pretrained writes it
        method = method_for_peft_type(raw["peft_type"])
        if method is None:
            problems.append(f"PEFT adapter type {str(raw['peft_type'])[:40]!r} is not served; this server serves "
                            f"{peft_types()} from PEFT folders, and "
                            f"{[m for m in served_method_names() if get_method(m).peft_type is None]} in its own "
                            "format")
            return None
        return method.parse_peft_config(raw, expect, problems, warnings)
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        warnings.append(f"{CONFIG_FILE}: ignoring unknown keys {unknown}")
    method = raw.get("method")
    if method not in method_names():
        problems.append(f"unknown method {method!r}; this server knows {served_method_names()} (and writes "
                        f"{[m for m in method_names() if get_method(m).separate_model]} out with `pica-serve merge`)")
    elif get_method(method).peft_type is not None:
        problems.append(f"method {method!r} is read from PEFT folders: upload the folder PEFT's save_pretrained "
                        f"wrote (peft_type {get_method(method).peft_type!r}) as it is")
        method = None
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r must be a positive integer, got {r!r}")
        r = None
    found, targets = check_target_modules(raw.get("target_modules"), expect.groups)
    problems += found
    if targets is not None and r is not None and all(t in expect.groups for t in targets):
        for t in targets:
            if r > expect.group_rank[t]:
                problems.append(f"r={r} exceeds the basis rank {expect.group_rank[t]} available for group {t!r}")
    checksum = raw.get("basis_checksum")
    if checksum is not None and checksum != expect.basis_checksum:
        problems.append(
            f"adapter was trained against basis {str(checksum)[:16]}..., this server's basis is "
            f"{expect.basis_checksum[:16]}... (another base model or target module set)"
        )
    kind = raw.get("basis_kind", "principal")
    if kind != expect.basis_kind:
        problems.append(f"adapter uses a {kind!r} basis, this server serves the {expect.basis_kind!r} basis")
    version = raw.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        problems.append(f"format_version {str(version)[:20]} is not served; this server reads format {FORMAT_VERSION} "
                        "(PiCa as M.<group> [out_features, r])")
    base_model = raw.get("base_model")
    if problems or method is None:
        return None
    return AdapterConfig(method, r, tuple(targets), base_model if isinstance(base_model, str) else None, checksum, kind)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or inf: their max-abs norms in one foreach call (as clip_grad_norm_
    does), then per tensor only where that finds one. Not two torch calls per tensor: in the engine core each
    call hands the GIL to the busy step loop and may wait a switch interval (5 ms) to get it back (cold adapter
    reads averaged ~270 ms under load on the H200, ~15 ms idle)."""
    sized = [t for t in tensors.values() if t.numel()]
    if not sized or bool(torch.isfinite(torch.stack(torch._foreach_norm(sized, float("inf")))).all()):
        return []
    return [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]


def parse_adapter(config_bytes: bytes, weights_bytes: bytes, expect: AdapterExpectation) -> Adapter:
    """Validate an adapter given its two files' bytes; raise AdapterValidationError listing all problems."""
    problems: list[str] = []
    warnings: list[str] = []
    config = _parse_config(config_bytes, expect, problems, warnings)
    try:
        tensors = load_safetensors_bytes(weights_bytes)
    except Exception as exc:  # safetensors raises its own error type for a bad header or truncation
        problems.append(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}")
        tensors = None
    if tensors is not None and config is not None:
        method = get_method(config.method)
        config = method.resolve(config, tensors, expect, problems)
        groups = {g: expect.groups[g] for g in config.target_modules}
        expected = method.expected_tensors_for(config, groups)
        optional = method.optional_tensors(config.r, groups)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected) - set(optional))
        expected = {**expected, **{name: shape for name, shape in optional.items() if name in tensors}}
        outdated = method.outdated_format(tensors)
        if outdated:
            problems.append(outdated)
            missing = extra = []
        if missing:
            problems.append(f"missing tensors {missing}")
        if extra:
            problems.append(f"unexpected tensors {extra} (target_modules is {list(config.target_modules)})")
        present = sorted(set(expected) & set(tensors))
        for name in present:
            t = tensors[name]
            if tuple(t.shape) != expected[name]:
                problems.append(f"tensor {name} has shape {list(t.shape)}, expected {list(expected[name])}")
            if t.dtype not in ALLOWED_DTYPES:
                problems.append(f"tensor {name} has dtype {t.dtype}, expected float32, bfloat16 or float16")
        floats = {n: tensors[n] for n in present if tensors[n].dtype in ALLOWED_DTYPES}
        bad = non_finite(floats)
        problems += [f"tensor {name} has non-finite values (NaN or inf)" for name in bad]
        problems += method.check_values({n: t for n, t in tensors.items() if tuple(t.shape) == expected.get(n)})
        if method.separate_model:
            sound = {n: t for n, t in floats.items() if tuple(t.shape) == expected[n] and n not in bad}
            problems += method.check_against_base(config, sound, expect)
    if problems:
        raise AdapterValidationError(problems)
    for w in warnings:
        log.warning(w)
    return Adapter(config, tensors, hashlib.sha256(weights_bytes).hexdigest(), tuple(warnings))


def load_adapter_dir(path: Path, expect: AdapterExpectation) -> Adapter:
    """Read and validate an adapter folder."""
    path = Path(path)
    problems = [f"missing {name} in {path}" for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if problems:
        raise AdapterValidationError(problems)
    return parse_adapter((path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes(), expect)


def save_adapter_dir(path: Path, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write an adapter folder (used by training and tests)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / WEIGHTS_FILE).write_bytes(save_safetensors_bytes({k: v.contiguous().cpu() for k, v in tensors.items()}))
    (path / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2))
