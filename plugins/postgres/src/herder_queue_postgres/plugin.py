"""Registers the ``postgres`` queue backend (entry point ``herder: postgres``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from herder.hookspecs import hookimpl

if TYPE_CHECKING:
    from herder.plugins import Registry


@hookimpl
def herder_register_queues(registry: Registry) -> None:
    """The queue in a PostgreSQL database, shared by the dispatchers that use it."""
    registry.add(
        "postgres",
        "herder_queue_postgres.backend:PostgresBackend",
        "PostgreSQL database (psycopg 3); LISTEN/NOTIFY between dispatchers",
    )
