"""herder's ``loopback`` driver: the local host as a cloud, one SSH server per instance.

The public names live in :mod:`herder_driver_loopback.driver`; they are re-exported here
lazily, so that loading the plugin module (``herder plugins``) does not import the SSH server.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "LoopbackDriver",
    "LoopbackInstance",
    "LoopbackInstanceSet",
    "LoopbackParameters",
    "default_state_dir",
    "local_instance_type",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("herder_driver_loopback.driver"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
