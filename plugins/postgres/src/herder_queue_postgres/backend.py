"""The ``postgres`` queue backend: its parameters and how the queue is opened from them."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from herder.cloud import SecretRef
from herder.config import Duration
from herder.queue.backend import DispatchLock, QueueBackend, QueueContext, QueueParameters
from herder.queue.base import QueueError

if TYPE_CHECKING:
    from collections.abc import Callable

    import psycopg

    from herder.queue.base import ContainerQueue
    from herder.spend import Ledger

__all__ = ["PostgresBackend", "PostgresParameters"]

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")


class PostgresParameters(QueueParameters):
    """``queue.backend_parameters`` for ``queue.backend: postgres``."""

    dsn: str = Field(
        description="libpq connection string or postgresql:// URI, without the password",
    )
    password: SecretRef | None = Field(
        None, description="the password, by reference: {env: VARIABLE} or {file: /path}"
    )
    schema_name: str = Field(
        "herder", description="schema of herder's tables; one per herder cluster in a database"
    )
    connect_timeout: Duration = Field(10.0, gt=0, description="timeout of one connection attempt")
    reconnect_for: Duration = Field(
        30.0, ge=0, description="how long a queue call waits for a lost database to come back"
    )
    standby: bool = Field(
        False,
        description="wait as the standby while another herder dispatches from this queue "
        "(serving the API), instead of refusing to start",
    )
    lease: Duration = Field(
        5.0,
        gt=0,
        description="standby: how soon a dispatcher that lost the database stops, and how "
        "often the standby tries the lock",
    )

    @field_validator("dsn")
    @classmethod
    def _no_password_inside(cls, value: str) -> str:
        """A password written in the DSN would be in the configuration file, in ``config show``
        and in any message quoting the DSN: refuse it (without quoting it back)."""
        from psycopg.conninfo import conninfo_to_dict

        try:
            parts = conninfo_to_dict(value)
        except Exception:
            raise ValueError("not a valid libpq connection string or postgresql:// URI") from None
        if "password" in parts or re.search(r"://[^/@]*:[^/@]*@", value):
            raise ValueError(
                "the DSN must not hold the password: give it by reference as "
                "password: {env: VARIABLE} or password: {file: /path}"
            )
        return value

    @field_validator("schema_name")
    @classmethod
    def _plain_schema(cls, value: str) -> str:
        if not _SCHEMA_RE.match(value):
            raise ValueError(
                "a schema name is 1-40 lowercase letters, digits and underscores, not starting "
                "with a digit"
            )
        return value

    def describe(self) -> str:
        """Where the queue is, without secrets: ``postgres herder@db:5432/herder schema x``."""
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(self.dsn)
        where = f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}"
        user = f"{parts['user']}@" if "user" in parts else ""
        return f"postgres {user}{where}/{parts.get('dbname', '')} schema {self.schema_name}"

    def connector(self, **libpq: Any) -> Callable[[], psycopg.Connection[Any]]:
        """A function opening a new autocommit connection (with more libpq ``libpq``
        parameters); the password is read from its reference at each connection (so a rotated
        secret is picked up on reconnect)."""
        import psycopg

        def connect() -> psycopg.Connection[Any]:
            extra: dict[str, Any] = {"connect_timeout": max(1, round(self.connect_timeout))}
            extra.update(libpq)
            if self.password is not None:
                try:
                    extra["password"] = self.password.read()
                except ValueError as exc:
                    raise QueueError(f"queue.backend_parameters.password: {exc}") from None
            extra.setdefault("application_name", "herder")
            return psycopg.connect(self.dsn, autocommit=True, **extra)

        return connect


class PostgresBackend(QueueBackend):
    """``queue.backend: postgres``: the queue in a PostgreSQL database."""

    parameters_model = PostgresParameters

    def open(self, params: QueueParameters, context: QueueContext) -> ContainerQueue:
        from herder_queue_postgres.queue import PostgresQueue

        assert isinstance(params, PostgresParameters)
        return PostgresQueue(
            params.connector(),
            context.rules(),
            schema=params.schema_name,
            reconnect_for=params.reconnect_for,
            exclusive=not params.standby,
        )

    def dispatch_lock(self, params: QueueParameters, context: QueueContext) -> DispatchLock | None:
        """With ``standby``, the queue is opened shared and the lock decides who dispatches;
        without, the queue itself refuses a second dispatcher."""
        from herder_queue_postgres.leader import PostgresDispatchLock

        assert isinstance(params, PostgresParameters)
        if not params.standby:
            return None
        lease = params.lease
        connect = params.connector(
            application_name="herder-dispatch-lock",
            keepalives=1,
            keepalives_idle=max(1, round(lease / 3)),
            keepalives_interval=1,
            keepalives_count=3,
            tcp_user_timeout=max(1000, round(lease * 1000)),
        )
        return PostgresDispatchLock(connect, schema=params.schema_name, lease=lease)

    def describe(self, params: QueueParameters, context: QueueContext) -> str:
        assert isinstance(params, PostgresParameters)
        return params.describe()

    def read_ledger(self, params: QueueParameters, path: str) -> Ledger:
        """The schema's spend ledger on a connection of its own that takes no lock, so that
        ``herder costs`` reads it on any host, whether a herder dispatches or not."""
        from herder_queue_postgres.queue import read_ledger

        assert isinstance(params, PostgresParameters)
        return read_ledger(params.connector(application_name="herder-costs"), params.schema_name)
