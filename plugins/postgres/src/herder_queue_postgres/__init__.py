"""herder's ``postgres`` queue backend: the container queue in a PostgreSQL database."""

from herder_queue_postgres.backend import PostgresBackend, PostgresParameters

__all__ = ["PostgresBackend", "PostgresParameters"]
