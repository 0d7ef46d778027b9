"""Method registry: one literal table from method name to its module.

Every method module provides ``Config`` (a frozen dataclass validated in ``__post_init__``), ``apply(model, config)
-> MethodHandle``, ``num_parameters(model, config)`` (the closed form of its trainable-parameter count),
``DESCRIPTION`` and ``PAPER``; optionally ``export(handle, dir, base_model_id)`` for a peer library's format.
The CLI, ``tunelab methods``, the compare command and the test matrix all read this table.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

REGISTRY: dict[str, str] = {
    "full": "tunelab.methods.full",
    "lora": "tunelab.methods.lora",
    "series": "tunelab.methods.series",
    "parallel": "tunelab.methods.parallel",
    "prompt": "tunelab.methods.prompt",
    "prefix": "tunelab.methods.prefix",
    "loreft": "tunelab.methods.loreft",
    "direft": "tunelab.methods.direft",
    "random-mask": "tunelab.methods.masking",
}


def get_method(name: str) -> ModuleType:
    """The module implementing method ``name``."""
    from tunelab.errors import ConfigError, suggest

    if name not in REGISTRY:
        raise ConfigError(f"unknown method '{name}'.{suggest(name, REGISTRY)} Methods: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


def build_method_config(section: dict[str, Any]) -> Any:
    """{'name': 'lora', 'r': 8, ...} -> tunelab.methods.lora.Config(r=8, ...), with typed checks."""
    from tunelab.schema import build

    options = {k: v for k, v in section.items() if k != "name"}
    module = get_method(str(section.get("name", "")))
    return build(module.Config, options, "method")


def method_options(name: str) -> list[tuple[str, str, Any]]:
    """(option, type, default) for `tunelab methods`."""
    cfg_cls = get_method(name).Config
    out = []
    for f in dataclasses.fields(cfg_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, str(f.type), default))
    return out
