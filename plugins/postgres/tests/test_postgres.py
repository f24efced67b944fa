"""The postgres queue against a real PostgreSQL on 127.0.0.1 (see conftest.py): the shipped
conformance suite, notifications between processes, reconnection, the dispatch lock, the
parameters as ``herder config check`` sees them, and the password kept out of every message."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from herder_queue_postgres.backend import PostgresBackend, PostgresParameters
from herder_queue_postgres.queue import PostgresQueue

from herder.config import Config, check_config
from herder.model import ContainerSpec, ContainerState
from herder.plugins import Plugins
from herder.queue.backend import QueueContext, open_queue
from herder.queue.base import ContainerQueue, QueueError, QueueUnavailable
from herder.runtime import VirtualRuntime
from herder.testing.queue_conformance import (
    QueueConformance,
    QueueFactory,
    QueueSettings,
    conformance_types,
)

SPEC = ContainerSpec(command=("true",))


def _open(params: dict[str, Any], settings: QueueSettings, **extra: Any) -> PostgresQueue:
    backend = PostgresBackend()
    context = QueueContext(
        runtime=settings.runtime,
        sizer=settings.sizer,
        cluster_id=settings.cluster_id,
        max_dispatch_attempts=settings.max_dispatch_attempts,
        always_use_preemptible=settings.always_use_preemptible,
    )
    parsed = backend.validate_parameters(params)
    assert isinstance(parsed, PostgresParameters)
    return PostgresQueue(
        parsed.connector(),
        context.rules(),
        schema=parsed.schema_name,
        reconnect_for=parsed.reconnect_for,
        **extra,
    )


class TestPostgresQueueConformance(QueueConformance):
    @pytest.fixture
    def queue_factory(self, pg_params: Callable[..., dict[str, Any]]) -> QueueFactory:
        def make(settings: QueueSettings) -> ContainerQueue:
            return _open(pg_params(), settings)

        return make


@pytest.fixture
def opened() -> Iterator[list[ContainerQueue]]:
    queues: list[ContainerQueue] = []
    yield queues
    for q in queues:
        q.close()


@pytest.fixture
def make_queue(
    pg_params: Callable[..., dict[str, Any]], opened: list[ContainerQueue]
) -> Callable[..., PostgresQueue]:
    def make(**extra: Any) -> PostgresQueue:
        q = _open(
            pg_params(reconnect_for=extra.pop("reconnect_for", 10)),
            QueueSettings(runtime=VirtualRuntime()),
            **extra,
        )
        opened.append(q)
        return q

    return make


def test_a_second_dispatcher_on_the_queue_is_refused(
    make_queue: Callable[..., PostgresQueue],
) -> None:
    first = make_queue()
    with pytest.raises(QueueError, match="in use by another herder"):
        make_queue()
    first.close()
    make_queue().submit(SPEC)  # the lock goes with the first queue


def test_a_submission_elsewhere_wakes_the_dispatcher(
    make_queue: Callable[..., PostgresQueue],
) -> None:
    dispatcher = make_queue()
    woken = threading.Event()
    dispatcher.subscribe(woken.set)
    assert dispatcher.listening.wait(10)
    api_only = make_queue(exclusive=False)
    c = api_only.submit(SPEC)
    assert woken.wait(10), "no notification reached the dispatcher"
    entries, _ = dispatcher.entries()
    assert entries[c.uuid].container.state is ContainerState.QUEUED
    # A cancellation through the other process reaches the dispatcher's snapshot too.
    woken.clear()
    api_only.cancel(c.uuid, "by the user")
    assert woken.wait(10)
    assert dispatcher.entries()[0][c.uuid].container.state is ContainerState.CANCELLED


def test_writers_in_two_processes_apply_the_rules_to_the_stored_record(
    make_queue: Callable[..., PostgresQueue],
) -> None:
    dispatcher = make_queue()
    api_only = make_queue(exclusive=False)
    c = dispatcher.submit(SPEC)
    api_only.cancel(c.uuid, "by the user")
    # The dispatcher's snapshot may not have heard yet; the lock reads the stored row.
    with pytest.raises(QueueError, match="cannot lock"):
        dispatcher.lock(c.uuid)


def test_calls_reconnect_after_the_connection_drops(
    make_queue: Callable[..., PostgresQueue], pg_cluster: Any
) -> None:
    queue = make_queue()
    c = queue.submit(SPEC)
    assert queue.listening.wait(10)
    assert pg_cluster.terminate() >= 2  # the queue's connection and its listener's
    locked = queue.lock(c.uuid)
    assert locked.state is ContainerState.LOCKED
    assert queue.get(c.uuid) == locked
    assert queue.counts()[ContainerState.LOCKED] == 1
    # The reconnected queue still holds the dispatch lock.
    with pytest.raises(QueueError, match="in use by another herder"):
        make_queue()


def test_listener_reconnects_and_catches_up(
    make_queue: Callable[..., PostgresQueue], pg_cluster: Any
) -> None:
    dispatcher = make_queue()
    api_only = make_queue(exclusive=False)
    assert dispatcher.listening.wait(10)
    pg_cluster.terminate()
    woken = threading.Event()
    dispatcher.subscribe(woken.set)
    c = api_only.submit(SPEC)
    assert woken.wait(15), "the dispatcher never heard of the submission"
    assert c.uuid in dispatcher.entries()[0]


def test_database_gone_is_unavailable_not_a_crash(
    make_queue: Callable[..., PostgresQueue], pg_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = make_queue(reconnect_for=0)
    c = queue.submit(SPEC)
    monkeypatch.setenv("HERDER_TEST_PG_PASSWORD", "wrong")  # every reconnect now fails
    pg_cluster.terminate()
    with pytest.raises(QueueUnavailable, match="unavailable") as caught:
        queue.lock(c.uuid)
    assert "wrong" not in str(caught.value)
    monkeypatch.setenv("HERDER_TEST_PG_PASSWORD", pg_cluster.password)
    assert queue.lock(c.uuid).state is ContainerState.LOCKED  # back when the database is


def test_password_never_reaches_logs_or_errors(
    pg_params: Callable[..., dict[str, Any]],
    pg_cluster: Any,
    caplog: pytest.LogCaptureFixture,
    opened: list[ContainerQueue],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = QueueSettings(runtime=VirtualRuntime())
    queue = _open(pg_params(reconnect_for=1), settings)
    opened.append(queue)
    pg_cluster.terminate()
    queue.submit(SPEC)
    assert (
        PostgresParameters.model_validate(pg_params())
        .describe()
        .startswith(f"postgres herder@127.0.0.1:{pg_cluster.port}/postgres schema t_")
    )
    # From a file too; a wrong one fails without saying what it was.
    secret = tmp_path / "pw"
    secret.write_text("not-the-password\n")
    with pytest.raises(QueueUnavailable) as caught:
        _open(pg_params(password={"file": str(secret)}, reconnect_for=0), settings)
    assert "not-the-password" not in str(caught.value)
    assert pg_cluster.password not in caplog.text
    assert "not-the-password" not in caplog.text


# --------------------------------------------------------------------------- configuration


@pytest.fixture
def plugins() -> Plugins:
    from herder_queue_postgres import plugin

    return Plugins.load(entry_points=False, extra=[plugin])


def _check(tmp_path: Path, plugins: Plugins, params: str) -> dict[str, str]:
    path = tmp_path / "herder.yaml"
    path.write_text(
        f"cloud: {{driver: sim}}\nqueue: {{backend: postgres, backend_parameters: {params}}}\n"
    )
    return {p.key: p.message for p in check_config(path, plugins)}


def test_config_check_validates_the_parameters(tmp_path: Path, plugins: Plugins) -> None:
    assert _check(tmp_path, plugins, "{dsn: 'host=db user=herder', password: {env: PW}}") == {}
    problems = _check(tmp_path, plugins, "{dsn: 'host=db password=hunter2', schema_name: 'A-b'}")
    assert set(problems) == {"queue.backend_parameters.dsn", "queue.backend_parameters.schema_name"}
    assert "by reference" in problems["queue.backend_parameters.dsn"]
    assert "hunter2" not in str(problems)
    problems = _check(tmp_path, plugins, "{dsn: 'postgresql://herder:hunter2@db/herder'}")
    assert set(problems) == {"queue.backend_parameters.dsn"} and "hunter2" not in str(problems)
    problems = _check(tmp_path, plugins, "{dsn: 'host=db', password: hunter2}")
    assert "by reference" in problems["queue.backend_parameters.password"]
    assert "hunter2" not in str(problems)
    assert set(_check(tmp_path, plugins, "{dsn: 'host=db', pasword: {env: X}}")) == {
        "queue.backend_parameters.pasword"
    }
    assert set(_check(tmp_path, plugins, "{}")) == {"queue.backend_parameters.dsn"}


def test_open_queue_builds_it_from_the_configuration(
    plugins: Plugins, pg_params: Callable[..., dict[str, Any]], opened: list[ContainerQueue]
) -> None:
    config = Config.model_validate(
        {
            "cluster_id": "pgtst",
            "containers": {"max_dispatch_attempts": 1},
            "queue": {"backend": "postgres", "backend_parameters": pg_params()},
        }
    )
    from herder.engine.sizing import ConfigSizer

    opened_queue = open_queue(
        config, plugins=plugins, runtime=VirtualRuntime(), sizer=ConfigSizer(conformance_types())
    )
    queue, where = opened_queue.queue, opened_queue.description
    opened.append(queue)
    assert where.startswith("postgres herder@127.0.0.1:")
    assert opened_queue.dispatch_lock is None  # no standby asked for: the queue is exclusive
    c = queue.submit(SPEC)
    assert c.uuid.startswith("pgtst-")
    queue.lock(c.uuid)
    assert queue.unlock(c.uuid).state is ContainerState.CANCELLED  # max_dispatch_attempts: 1


def test_a_commit_of_unknown_outcome_is_reported_then_read_back(
    make_queue: Callable[..., PostgresQueue],
) -> None:
    """The connection drops during COMMIT, after the server committed: the caller hears that
    the outcome is unknown, the queue re-reads what was stored, and retrying applies the rules
    to it: the lock is not counted twice."""
    import psycopg

    queue = make_queue()
    c = queue.submit(SPEC)
    assert queue.listening.wait(10)
    changed = threading.Event()
    queue.subscribe(changed.set)
    db = queue._db
    assert db is not None
    real_execute = db.execute

    def execute(query: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_execute(query, *args, **kwargs)
        if query == "COMMIT":
            db.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return result

    db.execute = execute  # type: ignore[method-assign]
    with pytest.raises(QueueUnavailable, match="while committing"):
        queue.lock(c.uuid)
    assert changed.wait(10), "the queue never re-read the container"
    assert queue.entries()[0][c.uuid].container.state is ContainerState.LOCKED
    with pytest.raises(QueueError, match="cannot lock"):
        queue.lock(c.uuid)
    got = queue.get(c.uuid)
    assert got is not None and got.lock_count == 1


def test_a_row_that_cannot_be_read_cancels_that_container_only(
    make_queue: Callable[..., PostgresQueue], pg_cluster: Any, schema_name: str
) -> None:
    queue = make_queue()
    good = queue.submit(SPEC)
    bad = queue.submit(SPEC)
    queue.close()
    with pg_cluster.connect() as db:
        db.execute(
            f"UPDATE {schema_name}.containers SET spec = %s WHERE uuid = %s",
            ('{"command": "x", "runtime_constraints": [1, 2]}', bad.uuid),
        )
    queue = make_queue()
    got = queue.get(bad.uuid)
    assert got is not None and got.state is ContainerState.CANCELLED
    assert "could not be read" in got.status("error")
    assert set(queue.entries()[0]) == {good.uuid}
    assert queue.lock(good.uuid).state is ContainerState.LOCKED


def test_a_batch_submitted_elsewhere_reaches_the_dispatcher(
    make_queue: Callable[..., PostgresQueue],
) -> None:
    dispatcher = make_queue()
    assert dispatcher.listening.wait(10)
    api_only = make_queue(exclusive=False)
    seen = threading.Event()
    dispatcher.subscribe(lambda: len(dispatcher.entries()[0]) == 5 and seen.set())
    batch = api_only.submit_many([SPEC] * 5)
    assert seen.wait(10), "the batch did not reach the dispatcher"
    assert set(dispatcher.entries()[0]) == {c.uuid for c in batch}


def test_a_schema_version_1_queue_is_upgraded_in_place(
    make_queue: Callable[..., PostgresQueue], pg_cluster: Any, schema_name: str
) -> None:
    """A queue written before listings by time and arrays (schema 1) keeps its containers and
    lists them newest first once a newer herder opens it."""
    from herder_queue_postgres.queue import MIGRATIONS

    with pg_cluster.connect() as db:
        db.execute(f"CREATE SCHEMA {schema_name}")
        db.execute(f"SET search_path TO {schema_name}")
        db.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        for n, created in enumerate((10.0, 30.0, 20.0)):
            db.execute(
                "INSERT INTO containers (uuid, state, priority, spec, created_at) "
                "VALUES (%s, 'Queued', 1, %s, %s)",
                (f"zzzzz-dz642-{n:015d}", '{"command": ["true"]}', created),
            )
    queue = make_queue()
    assert [c.uuid[-1] for c in queue.newest()] == ["1", "2", "0"]
    assert all(c.array_id == "" for c in queue.newest())
    with pg_cluster.connect() as db:
        row = db.execute(f"SELECT version FROM {schema_name}.schema_version").fetchone()
    assert row is not None and row[0] == len(MIGRATIONS)


def test_a_container_held_elsewhere_is_released_by_the_dispatcher(
    make_queue: Callable[..., PostgresQueue],
) -> None:
    """A container submitted through a standby, waiting for one the dispatcher runs, is
    released by the dispatcher when that one completes; the standby sees it."""
    from dataclasses import replace

    dispatcher = make_queue()
    assert dispatcher.listening.wait(10)
    api_only = make_queue(exclusive=False)
    assert api_only.listening.wait(10)
    first = dispatcher.submit(SPEC)
    arrived = threading.Event()
    dispatcher.subscribe(lambda: len(dispatcher.entries()[0]) == 2 and arrived.set())
    held = api_only.submit(replace(SPEC, after=(first.uuid,)))
    assert held.status("waiting_for") == first.uuid
    assert arrived.wait(10), "the held container did not reach the dispatcher"
    released = threading.Event()

    def check() -> None:
        c = api_only.get(held.uuid)
        if c is not None and not c.status("waiting_for"):
            released.set()

    api_only.subscribe(check)
    dispatcher.lock(first.uuid)
    dispatcher.set_running(first.uuid)
    dispatcher.finish(first.uuid, 0)
    got = dispatcher.get(held.uuid)
    assert got is not None and got.status("waiting_for") == ""
    assert released.wait(10), "the standby did not see the release"
    assert dispatcher.lock(held.uuid).state is ContainerState.LOCKED


def test_a_change_made_elsewhere_is_seen_at_once_by_a_no_op_transition(
    make_queue: Callable[..., PostgresQueue],
) -> None:
    """A transition that finds storage already changed by another process (nothing left to
    store) brings the snapshot up to date then, not when the notification arrives: a read
    right after it sees the change.  Two dispatchers releasing one held container raced on
    this."""
    dispatcher = make_queue()
    assert dispatcher.listening.wait(10)
    other = make_queue(exclusive=False)
    ctr = dispatcher.submit(SPEC)
    heard = threading.Event()
    dispatcher.subscribe(heard.set)
    with dispatcher._lock:  # hold this process's notifications back until the end
        other.set_priority(ctr.uuid, 7)
        heard.clear()
    assert dispatcher.set_priority(ctr.uuid, 7).priority == 7
    assert dispatcher.entries()[0][ctr.uuid].container.priority == 7
    assert heard.is_set()  # listeners were told of the change


def test_a_schema_from_before_attempts_is_upgraded_in_place_to_keep_them(
    make_queue: Callable[..., PostgresQueue], pg_cluster: Any, schema_name: str
) -> None:
    queue = make_queue()
    c = queue.submit(SPEC)
    queue.close()
    from herder_queue_postgres.queue import MIGRATIONS

    # As the version before attempts left it: every column and table added since taken out.
    step = next(i for i, sql in enumerate(MIGRATIONS) if "COLUMN attempts" in " ".join(sql))
    with pg_cluster.connect() as db:
        for statements in MIGRATIONS[step:]:
            for column in re.findall(r"ADD COLUMN (\w+)", " ".join(statements)):
                db.execute(f"ALTER TABLE {schema_name}.containers DROP COLUMN {column}")
            for table in re.findall(r"CREATE TABLE (\w+)", " ".join(statements)):
                db.execute(f"DROP TABLE {schema_name}.{table}")
        db.execute(f"UPDATE {schema_name}.schema_version SET version = {step}")
    queue = make_queue()
    assert queue.get(c.uuid) == c and c.attempt_history == ()
    queue.lock(c.uuid)
    queue.set_running(c.uuid, "i-1", "small")
    got = queue.get(c.uuid)
    assert got is not None and [a.instance_id for a in got.attempt_history] == ["i-1"]
    with pg_cluster.connect() as db:
        row = db.execute(f"SELECT version FROM {schema_name}.schema_version").fetchone()
    assert row is not None and row[0] == len(MIGRATIONS)
