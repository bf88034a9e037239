"""Adapter methods by name: `method` in adapter_config.json picks the class registered here."""

from __future__ import annotations

import importlib

_METHODS: dict = {}
_BUILTIN_MODULES = (
    "adapters.methods.pica", "adapters.methods.lora", "adapters.methods.psoft", "adapters.methods.cersa")


def register_method(cls):
    """Class decorator: make an AdapterMethod subclass available under its `name`."""
    _METHODS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def method_names() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def get_method(name: str):
    """An instance of the method registered as `name`; KeyError if none is."""
    _load_builtins()
    return _METHODS[name]()


def method_for_peft_type(peft_type):
    """An instance of the method that reads PEFT folders of this `peft_type` ('LORA', ...), or None."""
    _load_builtins()
    return next((cls() for cls in _METHODS.values() if cls.peft_type is not None and cls.peft_type == peft_type), None)


def peft_types() -> list[str]:
    _load_builtins()
    return sorted(cls.peft_type for cls in _METHODS.values() if cls.peft_type is not None)
