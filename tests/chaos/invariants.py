"""What must hold after a chaos run, each as a small check returning ``(name, ok, detail)``.

The queue-level checks read only herder's SQLite queue file, so any chaos harness (the sim
driver's, the loopback driver's) can use them:

* :func:`every_container_final`: every container is Complete, or Cancelled with a reason
  recorded (``runtime_status.error``); nothing is left Queued, Locked or Running, which is
  what a lost container looks like.
* :func:`queue_integrity`: ``PRAGMA integrity_check`` says ``ok`` (SIGKILL never corrupts it).
* :func:`no_overlapping_runs`: given ``(uuid, start, end)`` intervals from wherever the harness
  learns them, no container ran twice at the same time.

The sim-level checks read the simulated cloud (:mod:`herder.testing.sim_store`).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from herder.testing.sim_cloud import SimCloud
from herder.testing.sim_store import ProcessRecord

#: One checked invariant: its name, whether it held, and what was seen.
Check = tuple[str, bool, str]

FINAL_STATES = ("Complete", "Cancelled")
#: How many offending containers a detail names before it says "..." (details stay one line).
MAX_NAMED = 5


def _named(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_NAMED} more)" if len(items) > MAX_NAMED else ""
    return ", ".join(items[:MAX_NAMED]) + more


def _connect(db_path: str | Path) -> sqlite3.Connection:
    """A read-only connection: checking must never change what it checks."""
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)


def queue_rows(db_path: str | Path) -> list[tuple[str, str, int | None, dict[str, str]]]:
    """(uuid, state, exit code, runtime status) of every container in a queue file."""
    db = _connect(db_path)
    try:
        rows = db.execute(
            "SELECT uuid, state, exit_code, runtime_status FROM containers ORDER BY uuid"
        ).fetchall()
    finally:
        db.close()
    return [(uuid, state, code, json.loads(status or "{}")) for uuid, state, code, status in rows]


# --------------------------------------------------------------------------- queue level


def every_container_final(db_path: str | Path, expected: int | None = None) -> Check:
    """Every container is Complete, or Cancelled with a non-empty recorded reason.

    ``expected``: how many containers were submitted (a container missing from the queue is
    as lost as one stuck Running).
    """
    name = "every container reached a final state (Complete, or Cancelled with a reason)"
    rows = queue_rows(db_path)
    states = Counter(state for _, state, _, _ in rows)
    stuck = [f"{uuid} {state}" for uuid, state, _, _ in rows if state not in FINAL_STATES]
    unexplained = [
        f"{uuid} Cancelled without a reason"
        for uuid, state, _, status in rows
        if state == "Cancelled" and not str(status.get("error", "")).strip()
    ]
    problems = stuck + unexplained
    counts = ", ".join(f"{s} {n}" for s, n in sorted(states.items()))
    if expected is not None and len(rows) != expected:
        problems.insert(0, f"{len(rows)} containers in the queue, {expected} submitted")
    detail = counts if not problems else f"{counts}; {_named(problems)}"
    return name, not problems, detail


def queue_integrity(db_path: str | Path) -> Check:
    """SQLite's own consistency check of the queue file."""
    db = _connect(db_path)
    try:
        result = [row[0] for row in db.execute("PRAGMA integrity_check")]
    finally:
        db.close()
    return "queue file intact (PRAGMA integrity_check)", result == ["ok"], "; ".join(result)


def no_overlapping_runs(
    intervals: Iterable[tuple[str, float, float]], name: str = "no container ran twice at once"
) -> Check:
    """No two ``(uuid, start, end)`` intervals of one uuid overlap.

    Intervals are half-open: a copy that starts the moment the previous one ended did not run
    at the same time as it.
    """
    by_uuid: dict[str, list[tuple[float, float]]] = defaultdict(list)
    total = 0
    for uuid, start, end in intervals:
        by_uuid[uuid].append((start, end))
        total += 1
    overlaps = []
    for uuid, runs in sorted(by_uuid.items()):
        runs.sort()
        latest_end = runs[0][1]
        for start, end in runs[1:]:
            if start < latest_end:
                overlaps.append(f"{uuid} started at {start:.3f} before {latest_end:.3f}")
            latest_end = max(latest_end, end)
    detail = f"{total} runs of {len(by_uuid)} containers"
    if overlaps:
        detail += f"; {len(overlaps)} overlaps: {_named(overlaps)}"
    return name, not overlaps, detail


# --------------------------------------------------------------------------- sim level


def no_double_runs_detected(cloud: SimCloud) -> Check:
    """The simulated cloud saw no container start while another copy of it was alive."""
    details = cloud.stats.double_run_details
    named = [
        f"{d.uuid} on {d.instance_id} (alive on {', '.join(d.other_instance_ids)})" for d in details
    ]
    detail = f"{cloud.stats.container_starts} starts, {len(details)} double runs"
    if named:
        detail += f": {_named(named)}"
    return "no double run detected by the sim cloud", not details, detail


def no_instances_left(cloud: SimCloud) -> Check:
    """Nothing is left in the cloud's listing (the queue is empty, the idle timeout passed)."""
    with cloud.lock:
        now = cloud.now()
        cloud.settle(now)
        left = [f"{vm.id} ({vm.instance_type.name})" for vm in cloud.listed_vms(now)]
    stats = cloud.stats
    detail = f"{stats.created} created, {stats.destroyed} destroyed, {stats.disappeared} vanished"
    if left:
        detail += f"; left: {_named(left)}"
    return "no instance left behind", not left, detail


def faults_injected(faults: Mapping[str, int], required: Iterable[str]) -> Check:
    """Every required fault kind fired at least once."""
    required = list(required)
    missing = [kind for kind in required if faults.get(kind, 0) <= 0]
    detail = ", ".join(f"{kind} {faults.get(kind, 0)}" for kind in required)
    if missing:
        detail += f"; never fired: {', '.join(missing)}"
    return "every fault kind was injected", not missing, detail


def exit_codes_are_real(db_path: str | Path, processes: Iterable[ProcessRecord]) -> Check:
    """Every Complete container's exit code is one a process of it actually exited with.

    A container recorded Complete without ever running, or with another run's code, is as
    wrong as a lost one.
    """
    codes: dict[str, set[int | None]] = defaultdict(set)
    for proc in processes:
        codes[proc.uuid].add(proc.exit_code)
    wrong = [
        f"{uuid} exit {code}, ran with {sorted(codes[uuid], key=str) or 'no process'}"
        for uuid, state, code, _ in queue_rows(db_path)
        if state == "Complete" and code not in codes[uuid]
    ]
    complete = sum(1 for _, state, _, _ in queue_rows(db_path) if state == "Complete")
    detail = f"{complete} Complete containers checked"
    if wrong:
        detail += f"; {_named(wrong)}"
    return "every recorded exit code is one a run exited with", not wrong, detail
