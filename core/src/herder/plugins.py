"""The one place that talks to pluggy: loads plugins and answers "what is installed?".

Registries map a name to a dotted path (``package.module:Class``); the class is imported only
when that name is chosen, so an operator using the ``aws`` driver never imports the Azure SDK.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


class PluginError(Exception):
    """A plugin name is unknown, or its class cannot be loaded."""


@dataclass(frozen=True)
class Registration:
    kind: str  # "driver", "executor", "boot_probe"
    name: str
    target: str  # dotted path "pkg.module:Class"
    plugin: str  # name of the registering plugin
    description: str = ""


@dataclass
class Registry:
    """Collects the registrations of one hook call."""

    kind: str
    plugin: str = ""
    items: dict[str, Registration] = field(default_factory=dict)

    def add(self, name: str, target: str, description: str = "") -> None:
        if name in self.items and self.items[name].target != target:
            other = self.items[name].plugin
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by {other!r} and by {self.plugin!r}"
            )
        self.items[name] = Registration(self.kind, name, target, self.plugin, description)


def load_target(target: str) -> Any:
    """Import ``package.module:attr``."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr) if attr else module
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"cannot load {target}: {exc}") from exc
