"""Finds the base model's target nn.Linear modules and sorts them into functional groups.

A group is a module-name suffix (`q_proj`, `down_proj`, ...). PiCa shares one M (out x r)
across every layer of a group, so all of a group's layers must have the same out_features;
a model where they differ is refused with a message naming the group (in_features may differ,
since each layer has its own P [r, in]).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class GroupInfo:
    name: str
    out_features: int
    layers: tuple[str, ...]
    """Full module names, in model order."""
    in_features: tuple[int, ...]

    @property
    def max_rank(self) -> int:
        """Largest r every layer of the group can provide (P has min(out, in) rows)."""
        return min(min(self.out_features, i) for i in self.in_features)


class TargetError(ValueError):
    pass


def group_of(module_name: str) -> str:
    """The functional group of a module: its last name component (`model.layers.3.self_attn.q_proj` -> `q_proj`)."""
    return module_name.rsplit(".", 1)[-1]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `model`'s submodule called `name` (a dotted path) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def unwrap_modules(model: nn.Module, wrapper: type, inner: str) -> None:
    """Put back, for every `wrapper` module in `model`, the module it wraps (its attribute `inner`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, wrapper):
            replace_module(model, name, getattr(module, inner))


def find_target_linears(model: nn.Module, target_modules: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Full name -> nn.Linear for every Linear whose last name component is a target suffix."""
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and group_of(name) in target_modules
    }
    if not found:
        raise TargetError(f"no nn.Linear in the model matches target modules {list(target_modules)}")
    return found


def group_targets(linears: dict[str, nn.Linear], target_modules: tuple[str, ...]) -> dict[str, GroupInfo]:
    """Group target linears by suffix; refuse groups whose layers disagree on out_features."""
    by_group: dict[str, list[tuple[str, nn.Linear]]] = {}
    for name, module in linears.items():
        by_group.setdefault(group_of(name), []).append((name, module))
    problems, groups = [], {}
    for group in target_modules:
        members = by_group.get(group)
        if not members:
            problems.append(f"target module {group!r} matches no nn.Linear in the model")
            continue
        out_sizes = sorted({m.out_features for _, m in members})
        if len(out_sizes) > 1:
            problems.append(
                f"group {group!r} has layers with different out_features {out_sizes}: "
                "one shared M cannot fit them; target a narrower module set"
            )
            continue
        groups[group] = GroupInfo(
            name=group,
            out_features=out_sizes[0],
            layers=tuple(n for n, _ in members),
            in_features=tuple(m.in_features for _, m in members),
        )
    if problems:
        raise TargetError("; ".join(problems))
    return groups
