"""The names herder gives containers, arrays and container states.

Kept apart from :mod:`herder.model` (which re-exports them) because the command-line client
needs only these, and importing the model's records costs a client command about 16 ms of
start-up on every call.
"""

from __future__ import annotations

import re
from enum import StrEnum

#: ``<cluster_id>-dz642-<15 lowercase alphanumerics>``; cluster ids are 5 lowercase alphanumerics.
CONTAINER_UUID_RE = re.compile(r"^[a-z0-9]{5}-dz642-[a-z0-9]{15}$")
CLUSTER_ID_RE = re.compile(r"^[a-z0-9]{5}$")
#: ``<cluster_id>-a88ay-<15 lowercase alphanumerics>``: the id shared by an array's members.
ARRAY_ID_RE = re.compile(r"^[a-z0-9]{5}-a88ay-[a-z0-9]{15}$")
#: The environment variable that tells each member of an array its index (0 to count - 1).
ARRAY_INDEX_ENV = "HERDER_ARRAY_INDEX"
#: The environment variable that tells each member of an array the array's id.
ARRAY_ID_ENV = "HERDER_ARRAY_ID"


def is_container_uuid(text: str) -> bool:
    """True for a well-formed container UUID (safe to put in a shell command unquoted)."""
    return bool(CONTAINER_UUID_RE.fullmatch(text))


def is_array_id(text: str) -> bool:
    """True for a well-formed array id (see :data:`ARRAY_ID_RE`)."""
    return bool(ARRAY_ID_RE.fullmatch(text))


class ContainerState(StrEnum):
    QUEUED = "Queued"
    LOCKED = "Locked"
    RUNNING = "Running"
    COMPLETE = "Complete"
    CANCELLED = "Cancelled"

    @property
    def final(self) -> bool:
        return self in (ContainerState.COMPLETE, ContainerState.CANCELLED)
