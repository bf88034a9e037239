"""Adapter methods by name: `method` in adapter_config.json picks the class registered here."""

from __future__ import annotations

import importlib

_METHODS: dict = {}
_BUILTIN_MODULES = ("adapters.methods.pica",)


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
