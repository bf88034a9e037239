"""What the methods that read PEFT's `save_pretrained` folders (LoRA, PSOFT) share: the tensor name prefix and
the checks of adapter_config.json every such method makes."""

from __future__ import annotations

PEFT_PREFIX = "base_model.model."
"""PEFT's prefix of every saved tensor name, before the base model's module path."""


def common_config_problems(raw: dict, unserved_options: dict[str, str]) -> list[str]:
    """Why this adapter_config.json cannot be served, in what every PEFT method checks: options set that this
    server does not serve (option -> why), and the rank `r`."""
    problems = [why for key, why in unserved_options.items() if raw.get(key)]
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r must be a positive integer, got {r!r}")
    return problems
