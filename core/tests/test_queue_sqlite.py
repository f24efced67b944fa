"""The embedded SQLite container queue: state rules, durability, snapshot, logs, paging."""

from __future__ import annotations

import re
import sqlite3
import threading
from dataclasses import replace

import pytest

from herder.engine.sizing import ConfigSizer
from herder.model import (
    Container,
    ContainerSpec,
    ContainerState,
    InstanceType,
    RuntimeConstraints,
    SchedulingParameters,
    is_container_uuid,
)
from herder.queue.base import ContainerNotFound, InvalidTransition, QueueError
from herder.queue.rules import RuleSettings
from herder.queue.sqlite import _MIGRATIONS, InvalidRequest, SqliteQueue
from herder.runtime import VirtualRuntime

GiB = 1 << 30
Q, L, R = ContainerState.QUEUED, ContainerState.LOCKED, ContainerState.RUNNING
DONE, CANCELLED = ContainerState.COMPLETE, ContainerState.CANCELLED

SMALL = InstanceType("small", "t.small", vcpus=2, ram=4 * GiB, included_scratch=50 * GiB, price=0.1)
BIG = InstanceType("big", "t.big", vcpus=8, ram=32 * GiB, included_scratch=200 * GiB, price=0.4)
SMALL_SPOT = replace(SMALL, name="small.spot", preemptible=True, price=0.03)
TYPES = {t.name: t for t in (SMALL, BIG, SMALL_SPOT)}


def spec(vcpus: int = 1, ram: int = GiB, priority: int = 1, **kw: object) -> ContainerSpec:
    return ContainerSpec(
        command=("echo", "hi"),
        runtime_constraints=RuntimeConstraints(vcpus=vcpus, ram=ram),
        priority=priority,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def rt() -> VirtualRuntime:
    return VirtualRuntime()


def make_queue(rt: VirtualRuntime, path: str = ":memory:", types=TYPES, **kw) -> SqliteQueue:
    return SqliteQueue(path, RuleSettings(rt, ConfigSizer(types), **kw))


@pytest.fixture
def q(rt: VirtualRuntime):
    queue = make_queue(rt, max_dispatch_attempts=3)
    yield queue
    queue.close()


def running(q: SqliteQueue, s: ContainerSpec | None = None) -> Container:
    c = q.submit(s or spec())
    q.lock(c.uuid)
    return q.set_running(c.uuid, "i-1", "small")


# --------------------------------------------------------------------------- submission


def test_submit_stores_queued_container_and_sizes_it_once(q, rt):
    c = q.submit(spec(vcpus=4, ram=8 * GiB, name="job"))
    assert c.state is Q and c.priority == 1 and c.lock_count == 0
    assert c.created_at == rt.now() and c.spec.name == "job"
    assert is_container_uuid(c.uuid) and c.uuid.startswith("zzzzz-dz642-")
    rt.advance(5)
    entries, threshold = q.entries()
    assert threshold == rt.now()
    ent = entries[c.uuid]
    assert ent.container == c
    assert [t.name for t in ent.instance_types] == ["big"]
    assert ent.resources.vcpus == 4 and ent.resources.ram == 8 * GiB * 100 // 95
    assert ent.first_seen_at == rt.now() - 5
    assert q.get(c.uuid) == c


def test_uuids_use_cluster_id_and_are_distinct(rt):
    q = make_queue(rt, cluster_id="ab1cd")
    uuids = {q.submit(spec()).uuid for _ in range(200)}
    assert len(uuids) == 200
    assert all(is_container_uuid(u) and u.startswith("ab1cd-dz642-") for u in uuids)
    with pytest.raises(ValueError, match="cluster_id"):
        make_queue(rt, cluster_id="Bad")


@pytest.mark.parametrize(
    "bad",
    [
        ContainerSpec(command=()),
        spec(priority=-1),
        spec(vcpus=-1),
        spec(ram=-1),
        ContainerSpec(command=("x",), runtime_constraints=RuntimeConstraints(scratch=-5)),
    ],
)
def test_submit_rejects_invalid_specs_and_stores_nothing(q, bad):
    with pytest.raises(InvalidRequest, match="invalid container"):
        q.submit(bad)
    with pytest.raises(ValueError):  # also a ValueError for generic callers
        q.submit_many([spec(), bad])
    assert q.list() == [] and q.entries()[0] == {}


def test_unsatisfiable_submission_is_cancelled_with_reason(q, rt):
    c = q.submit(spec(vcpus=64))
    assert c.state is CANCELLED and c.finished_at == rt.now()
    assert c.status("error").startswith("cannot run container: constraints not satisfiable")
    assert c.uuid not in q.entries()[0]
    assert q.get(c.uuid) == c
    assert q.counts()[CANCELLED] == 1


def test_always_use_preemptible_marks_submissions_preemptible(rt):
    q = make_queue(rt, always_use_preemptible=True)
    c = q.submit(spec())
    assert c.scheduling_parameters.preemptible
    assert [t.name for t in q.entries()[0][c.uuid].instance_types] == ["small.spot"]
    # Without the option, the same spec goes to on-demand types.
    plain = make_queue(rt).submit(spec())
    assert not plain.scheduling_parameters.preemptible


def test_submit_many_is_one_batch(q):
    notified = []
    q.subscribe(lambda: notified.append(1))
    made = q.submit_many([spec(priority=i) for i in range(10_000)])
    assert len(made) == 10_000 and len({c.uuid for c in made}) == 10_000
    assert len(q.entries()[0]) == 10_000
    assert q.counts()[Q] == 10_000
    assert notified == [1]
    assert q.submit_many([]) == []


# --------------------------------------------------------------------------- state rules


def test_lock_needs_queued_and_positive_priority(q, rt):
    c = q.submit(spec())
    rt.advance(3)
    locked = q.lock(c.uuid)
    assert locked.state is L and locked.lock_count == 1 and locked.locked_at == rt.now()
    with pytest.raises(InvalidTransition):
        q.lock(c.uuid)
    held = q.submit(spec(priority=0))
    with pytest.raises(InvalidTransition, match="priority 0"):
        q.lock(held.uuid)
    assert q.get(held.uuid).state is Q


def test_unlock_requeues_and_counts_attempts(q):
    c = q.submit(spec())
    with pytest.raises(InvalidTransition, match="unlock"):
        q.unlock(c.uuid)
    q.lock(c.uuid)
    back = q.unlock(c.uuid)
    assert back.state is Q and back.lock_count == 1 and back.locked_at is None
    assert q.lock(c.uuid).lock_count == 2


def test_unlock_past_the_attempt_cap_cancels(q, rt):
    c = q.submit(spec())
    for _ in range(2):
        q.lock(c.uuid)
        assert q.unlock(c.uuid).state is Q
    q.lock(c.uuid)  # third attempt: lock_count == max_dispatch_attempts
    gone = q.unlock(c.uuid)
    assert gone.state is CANCELLED and gone.finished_at == rt.now()
    assert gone.status("error") == (
        "Failed to start container.  Cancelled after exceeding "
        "'containers.max_dispatch_attempts' (lock_count=3)"
    )
    assert q.get(c.uuid) == gone


def test_set_running_from_locked_only(q, rt):
    c = q.submit(spec())
    with pytest.raises(InvalidTransition):
        q.set_running(c.uuid, "i-1", "small")
    q.lock(c.uuid)
    rt.advance(2)
    r = q.set_running(c.uuid, "i-1", "small")
    assert r.state is R and r.started_at == rt.now()
    assert (r.instance_id, r.instance_type) == ("i-1", "small")
    rt.advance(2)
    assert q.set_running(c.uuid, "i-other", "big") is r  # no-op when already running
    q.finish(c.uuid, 0)
    with pytest.raises(InvalidTransition):
        q.set_running(c.uuid)


def test_finish(q, rt):
    r = running(q)
    rt.advance(10)
    done = q.finish(r.uuid, 3)
    assert done.state is DONE and done.exit_code == 3 and done.finished_at == rt.now()
    rt.advance(1)
    assert q.finish(r.uuid, 0) is done  # final: no-op returning the record
    locked = q.submit(spec())
    q.lock(locked.uuid)
    assert q.finish(locked.uuid, 1).state is DONE  # exited before we saw it running
    with pytest.raises(InvalidTransition):
        q.finish(q.submit(spec()).uuid, 0)


def test_retry_requeues_with_a_warning(q):
    r = running(q)
    back = q.retry(r.uuid, "instance vanished")
    assert back.state is Q and back.status("warning") == "instance vanished"
    assert (back.instance_id, back.instance_type, back.started_at) == ("", "", None)
    with pytest.raises(InvalidTransition):
        q.retry(r.uuid, "again")
    q.lock(r.uuid)
    assert q.retry(r.uuid, "boot failed").status("warning") == "boot failed"  # from Locked


def test_retry_past_the_attempt_cap_cancels(q):
    r = running(q)
    for _ in range(2):
        q.retry(r.uuid, "lost")
        q.lock(r.uuid)
    assert q.get(r.uuid).lock_count == 3
    gone = q.retry(r.uuid, "runner lost")
    assert gone.state is CANCELLED
    assert gone.status("error") == "runner lost; cancelled after 3 dispatch attempts"
    assert q.retry(r.uuid, "late") is gone  # final: left alone


def test_cancel(q, rt):
    c = q.submit(spec())
    gone = q.cancel(c.uuid, "user asked")
    assert gone.state is CANCELLED and gone.status("error") == "user asked"
    assert gone.finished_at == rt.now()
    assert q.cancel(c.uuid, "twice") is gone
    quiet = q.cancel(running(q).uuid)
    assert quiet.state is CANCELLED and quiet.status("error") == ""
    done = q.submit(spec())
    q.lock(done.uuid)
    finished = q.finish(done.uuid, 0)
    assert q.cancel(done.uuid, "too late") is finished


def test_set_priority(q):
    c = q.submit(spec(priority=1))
    assert q.set_priority(c.uuid, 7).priority == 7
    assert q.entries()[0][c.uuid].container.priority == 7
    with pytest.raises(InvalidRequest):
        q.set_priority(c.uuid, -1)
    q.cancel(c.uuid)
    with pytest.raises(InvalidTransition):
        q.set_priority(c.uuid, 3)


def test_add_cost_accumulates(q):
    r = running(q)
    q.add_cost(r.uuid, 0.25)
    q.add_cost(r.uuid, 0.5)
    assert q.get(r.uuid).cost == pytest.approx(0.75)
    assert q.list()[0].cost == pytest.approx(0.75)
    with pytest.raises(InvalidRequest):
        q.add_cost(r.uuid, -1.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda q, u: q.lock(u),
        lambda q, u: q.unlock(u),
        lambda q, u: q.set_running(u),
        lambda q, u: q.finish(u, 0),
        lambda q, u: q.retry(u, "x"),
        lambda q, u: q.cancel(u),
        lambda q, u: q.set_priority(u, 2),
        lambda q, u: q.add_cost(u, 1.0),
        lambda q, u: q.append_log(u, b"x"),
        lambda q, u: q.read_log(u),
    ],
)
def test_unknown_uuid(q, call):
    with pytest.raises(ContainerNotFound) as info:
        call(q, "zzzzz-dz642-000000000000000")
    assert info.value.uuid == "zzzzz-dz642-000000000000000"


def test_get_unknown_is_none(q):
    assert q.get("zzzzz-dz642-000000000000000") is None


# --------------------------------------------------------------------------- snapshot


def test_entries_is_a_stable_snapshot(q):
    c = q.submit(spec())
    before, _ = q.entries()
    old_entry = before[c.uuid]
    q.lock(c.uuid)
    assert old_entry.container.state is Q  # records are replaced, never changed
    after, _ = q.entries()
    assert after[c.uuid].container.state is L
    assert after[c.uuid].instance_types is old_entry.instance_types  # sized once
    before.clear()
    assert c.uuid in q.entries()[0]


def test_forget_only_final_or_held_containers(q):
    queued = q.submit(spec())
    held = q.submit(spec(priority=0))
    locked = q.submit(spec())
    q.lock(locked.uuid)
    run = running(q)
    done = running(q)
    q.finish(done.uuid, 0)
    for c in (queued, held, locked, run, done):
        q.forget(c.uuid)
    q.forget("zzzzz-dz642-000000000000000")  # unknown: ignored
    assert set(q.entries()[0]) == {queued.uuid, locked.uuid, run.uuid}
    assert q.get(done.uuid).state is DONE  # still in storage
    assert q.get(held.uuid).state is Q


def test_forgotten_held_container_reenters_when_priority_is_raised(q, rt):
    held = q.submit(spec(priority=0))
    q.forget(held.uuid)
    assert q.set_priority(held.uuid, 0) is not None
    assert held.uuid not in q.entries()[0]  # still on hold: stays out
    rt.advance(60)
    q.set_priority(held.uuid, 5)
    ent = q.entries()[0][held.uuid]
    assert ent.container.priority == 5 and [t.name for t in ent.instance_types] == ["small"]
    assert ent.first_seen_at == rt.now()
    assert q.lock(held.uuid).state is L


def test_forgotten_final_container_does_not_reenter(q):
    c = q.submit(spec())
    q.cancel(c.uuid)
    q.forget(c.uuid)
    q.cancel(c.uuid)
    q.finish(c.uuid, 0)
    assert c.uuid not in q.entries()[0]


def test_requeued_containers_stay_in_the_snapshot(q):
    r = running(q)
    q.retry(r.uuid, "lost")
    assert q.entries()[0][r.uuid].container.state is Q
    q.lock(r.uuid)
    q.unlock(r.uuid)
    assert q.entries()[0][r.uuid].container.state is Q


# --------------------------------------------------------------------------- durability


def test_restart_restores_active_containers(rt, tmp_path):
    path = str(tmp_path / "queue.db")
    q = make_queue(rt, path)
    queued = q.submit(spec(name="a"))
    locked = q.submit(spec())
    q.lock(locked.uuid)
    run = running(q, spec(vcpus=4, ram=8 * GiB))
    q.add_cost(run.uuid, 1.5)
    done = running(q)
    done = q.finish(done.uuid, 2)
    q.append_log(done.uuid, b"hello ")
    q.append_log(done.uuid, b"world")
    unsat = q.submit(spec(vcpus=99))
    before = {c.uuid: q.get(c.uuid) for c in (queued, locked, run, done, unsat)}
    q.close()

    rt.advance(100)
    q2 = make_queue(rt, path)
    entries, _ = q2.entries()
    assert set(entries) == {queued.uuid, locked.uuid, run.uuid}
    for uuid, c in before.items():
        assert q2.get(uuid) == c
    assert entries[run.uuid].container.cost == 1.5
    assert [t.name for t in entries[run.uuid].instance_types] == ["big"]
    # first seen when created, not at the restart: equal priorities keep their order of age
    assert entries[queued.uuid].first_seen_at == queued.created_at < rt.now()
    assert q2.read_log(done.uuid) == b"hello world"
    assert q2.counts() == {Q: 1, L: 1, R: 1, DONE: 1, CANCELLED: 1}
    q2.close()


def test_file_database_uses_wal_and_records_schema_version(rt, tmp_path):
    path = str(tmp_path / "queue.db")
    make_queue(rt, path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(_MIGRATIONS),)]
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(QueueError, match="newer"):
        make_queue(rt, path)


def test_restart_with_fewer_types_cancels_what_no_longer_fits(rt, tmp_path):
    path = str(tmp_path / "queue.db")
    q = make_queue(rt, path)
    big_queued = q.submit(spec(vcpus=4, ram=8 * GiB))
    big_locked = q.submit(spec(vcpus=4, ram=8 * GiB))
    q.lock(big_locked.uuid)
    big_running = running(q, spec(vcpus=4, ram=8 * GiB))
    small = q.submit(spec())
    q.close()

    q2 = make_queue(rt, path, types={"small": SMALL})
    entries, _ = q2.entries()
    for uuid in (big_queued.uuid, big_locked.uuid):
        c = q2.get(uuid)
        assert c.state is CANCELLED
        assert c.status("error").startswith("cannot run container: ")
        assert uuid not in entries
    # A running container is kept (it runs somewhere already) with no eligible types.
    assert entries[big_running.uuid].instance_types == []
    assert entries[big_running.uuid].container.state is R
    assert [t.name for t in entries[small.uuid].instance_types] == ["small"]
    # It cannot be queued again once it loses its runner: nothing would ever run it.
    gone = q2.retry(big_running.uuid, "lost")
    assert gone.state is CANCELLED and gone.status("error").startswith("cannot run container:")
    q2.close()

    q3 = make_queue(rt, path, types={"small": SMALL})
    assert q3.get(big_queued.uuid).state is CANCELLED  # the cancellation was stored
    assert set(q3.entries()[0]) == {small.uuid}


# --------------------------------------------------------------------------- logs


def test_logs_read_by_byte_offset(q):
    c = q.submit(spec())
    assert q.read_log(c.uuid) == b""
    for chunk in (b"abc", b"", b"defgh", b"ij"):
        q.append_log(c.uuid, chunk)
    assert q.read_log(c.uuid) == b"abcdefghij"
    assert q.read_log(c.uuid, 2) == b"cdefghij"
    assert q.read_log(c.uuid, 2, 4) == b"cdef"
    assert q.read_log(c.uuid, 3, 5) == b"defgh"
    assert q.read_log(c.uuid, 4, 100) == b"efghij"
    assert q.read_log(c.uuid, 9, 0) == b""
    assert q.read_log(c.uuid, 10) == b""
    assert q.read_log(c.uuid, 50, 5) == b""
    with pytest.raises(InvalidRequest):
        q.read_log(c.uuid, -1)
    other = q.submit(spec())
    q.append_log(other.uuid, b"zzz")
    assert q.read_log(c.uuid) == b"abcdefghij"


def test_a_client_can_follow_a_log(q):
    c = running(q)
    got, offset = b"", 0
    for i in range(20):
        q.append_log(c.uuid, f"line {i}\n".encode())
        if i % 3 == 0:
            piece = q.read_log(c.uuid, offset, 7)
            got, offset = got + piece, offset + len(piece)
    q.finish(c.uuid, 0)
    q.append_log(c.uuid, b"final\n")  # logs may arrive after the container finished
    while piece := q.read_log(c.uuid, offset, 7):
        got, offset = got + piece, offset + len(piece)
    assert got == b"".join(f"line {i}\n".encode() for i in range(20)) + b"final\n"


# --------------------------------------------------------------------------- listing


def test_list_pages_by_uuid(q):
    made = q.submit_many([spec() for _ in range(25)])
    for c in made[:5]:
        q.lock(c.uuid)
    seen, after = [], ""
    while page := q.list(limit=10, after=after):
        assert len(page) <= 10
        seen += page
        after = page[-1].uuid
    assert [c.uuid for c in seen] == sorted(c.uuid for c in made)
    locked = q.list(states=[L], limit=100)
    assert sorted(c.uuid for c in locked) == sorted(c.uuid for c in made[:5])
    assert all(c.state is L for c in locked)
    assert len(q.list(states=[Q, L], limit=100)) == 25
    assert q.list(states=[]) == []
    assert q.list(limit=0) == []


def test_counts_by_state(q):
    assert q.counts() == dict.fromkeys(ContainerState, 0)
    q.submit(spec())
    q.lock(q.submit(spec()).uuid)
    q.submit(spec(vcpus=100))
    assert q.counts() == {Q: 1, L: 1, R: 0, DONE: 0, CANCELLED: 1}


# --------------------------------------------------------------------------- notifications


def test_listeners_hear_every_change_after_it_is_visible(q):
    seen: list[ContainerState | None] = []
    target: list[str] = []

    def listener() -> None:
        c = q.get(target[0]) if target else None  # reading the queue here must not deadlock
        seen.append(c.state if c else None)

    unsubscribe = q.subscribe(listener)
    c = q.submit(spec())
    target.append(c.uuid)
    q.lock(c.uuid)
    q.set_running(c.uuid)
    q.set_running(c.uuid)  # no-op: no notification
    q.add_cost(c.uuid, 1.0)
    q.finish(c.uuid, 0)
    q.forget(c.uuid)  # not a change to a container
    assert seen == [None, L, R, R, DONE]
    unsubscribe()
    unsubscribe()  # harmless twice
    q.submit(spec())
    assert len(seen) == 5


def test_a_failing_listener_does_not_stop_the_others(q):
    calls = []

    def broken() -> None:
        raise RuntimeError("boom")

    q.subscribe(broken)
    q.subscribe(lambda: calls.append(1))
    c = q.submit(spec())
    assert calls == [1]
    assert q.get(c.uuid) == c


# --------------------------------------------------------------------------- threads


def test_concurrent_lock_unlock_is_consistent(rt):
    q = make_queue(rt, max_dispatch_attempts=1_000_000)
    made = q.submit_many([spec() for _ in range(5)])
    wins = [0] * 6
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(300):
                uuid = made[(n + i) % len(made)].uuid
                try:
                    q.lock(uuid)
                except InvalidTransition:
                    continue
                wins[n] += 1
                q.entries()
                q.unlock(uuid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    records = [q.get(c.uuid) for c in made]
    assert all(c.state is Q for c in records)
    assert sum(c.lock_count for c in records) == sum(wins) > 0
    assert all(e.container == q.get(u) for u, e in q.entries()[0].items())


def test_scheduling_parameters_survive_storage(rt, tmp_path):
    path = str(tmp_path / "q.db")
    q = make_queue(rt, path)
    s = ContainerSpec(
        command=("sh", "-c", "echo $X"),
        image="debian:12",
        environment=(("X", "1"), ("Y", "two")),
        cwd="/tmp",
        runtime="process",
        runtime_constraints=RuntimeConstraints(vcpus=0, ram=GiB, scratch=GiB),
        scheduling_parameters=SchedulingParameters(max_run_time=60.0, supervisor=True),
        priority=9,
        name="n",
    )
    c = q.submit(s)
    q.close()
    assert make_queue(rt, path).get(c.uuid).spec == s


def test_schema_version_1_file_is_upgraded_in_place(rt, tmp_path):
    """A queue file written before listings by time and arrays (schema 1) opens, keeps its
    containers, and lists them newest first; ``herder queue check`` reads it before too."""
    from herder.queue.sqlite import _MIGRATIONS, check_file

    path = str(tmp_path / "queue.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version (version) VALUES (1)")
    for statement in _MIGRATIONS[0]:
        db.execute(statement)
    for n, created in enumerate((10.0, 30.0, 20.0)):
        db.execute(
            "INSERT INTO containers (uuid, state, priority, spec, created_at) "
            "VALUES (?, 'Queued', 1, ?, ?)",
            (f"zzzzz-dz642-{n:015d}", '{"command": ["true"]}', created),
        )
    db.commit()
    db.close()
    assert check_file(path)["containers"] == {"Queued": 3}
    q = make_queue(rt, path)
    try:
        assert [c.uuid[-1] for c in q.newest()] == ["1", "2", "0"]
        assert all(c.array_id == "" for c in q.newest())
    finally:
        q.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(_MIGRATIONS),)]
    db.close()


def test_a_dependency_that_finished_before_a_stop_releases_its_waiter_at_reopen(rt, tmp_path):
    """If herder stopped between finishing a container and releasing those that waited for
    it, the queue settles them when it opens again."""
    path = str(tmp_path / "queue.db")
    q = make_queue(rt, path)
    first = q.submit(spec())
    ok_waiter = q.submit(replace(spec(), after=(first.uuid,)))
    failed = q.submit(spec())
    doomed = q.submit(replace(spec(), after=(failed.uuid,)))
    q.close()
    db = sqlite3.connect(path)
    db.execute(
        "UPDATE containers SET state = 'Complete', exit_code = 0 WHERE uuid = ?", (first.uuid,)
    )
    db.execute(
        "UPDATE containers SET state = 'Complete', exit_code = 2 WHERE uuid = ?", (failed.uuid,)
    )
    db.commit()
    db.close()
    q = make_queue(rt, path)
    try:
        released = q.get(ok_waiter.uuid)
        assert released is not None and released.status("waiting_for") == ""
        assert q.lock(ok_waiter.uuid).state is L
        cancelled = q.get(doomed.uuid)
        assert cancelled is not None and cancelled.state is CANCELLED
        assert "exit code 2" in cancelled.status("error")
    finally:
        q.close()


def test_a_file_from_before_attempts_is_upgraded_in_place_to_keep_them(rt, tmp_path):
    path = str(tmp_path / "queue.db")
    q = make_queue(rt, path)
    c = q.submit(spec())
    q.close()
    # As the version before attempts left it: every column and table added since taken out.
    step = next(i for i, sql in enumerate(_MIGRATIONS) if "COLUMN attempts" in " ".join(sql))
    db = sqlite3.connect(path)
    for statements in _MIGRATIONS[step:]:
        for column in re.findall(r"ADD COLUMN (\w+)", " ".join(statements)):
            db.execute(f"ALTER TABLE containers DROP COLUMN {column}")
        for table in re.findall(r"CREATE TABLE (\w+)", " ".join(statements)):
            db.execute(f"DROP TABLE {table}")
    db.execute("UPDATE schema_version SET version = ?", (step,))
    db.commit()
    db.close()
    q = make_queue(rt, path)
    assert q.get(c.uuid) == c and c.attempt_history == ()
    q.lock(c.uuid)
    q.set_running(c.uuid, "i-1", "small")
    assert [a.instance_id for a in q.get(c.uuid).attempt_history] == ["i-1"]
    q.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(_MIGRATIONS),)]
    db.close()
