"""The chaos suite on the loopback driver: real ``herder serve``, real SSH, real processes.

``herder serve`` runs as a child process (:mod:`loopback_child`) on the loopback driver while
this harness submits containers through the management API and injects faults:

* the dispatcher is SIGKILLed at seeded moments, while containers run, and started again (it
  adopts the instances and the containers the runner detached);
* the SSH server of a loopback instance that runs containers is stopped for a few seconds and
  started again, under the running dispatcher (the child does it on the harness's request);
* a few containers are cancelled through the API, queued or running.

Each container's command appends ``start <id> <ns> <pid>`` and ``end <id> <ns> <why>`` lines
(``>>`` opens with O_APPEND) to one file, which gives every run's interval.  When the queue is
empty and the idle timeout has passed, the harness checks: every container is final (Complete,
or Cancelled with a reason), no container ran twice at once, every container the harness did not
cancel completed a full run with exit code 0, no instance and no container process is left,
the queue file passes ``PRAGMA integrity_check``, and every requested fault was injected.

By hand::

    uv run python tests/chaos/loopback_chaos.py --containers 100 --kills 3 --seed 7

prints the report and exits 1 if an invariant failed.  The run's directory (configuration,
queue, ``serve.log``, the intervals file) is removed on success and kept on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from invariants import (  # a sibling module, found through the path above
    Check,
    every_container_final,
    faults_injected,
    no_overlapping_runs,
    queue_integrity,
    queue_rows,
)
from serve_process import ServeProcess

from herder.app.client import ClientError

CHILD = Path(__file__).resolve().parent / "loopback_child.py"
CANCEL_REASON = "cancelled by the chaos harness"
UNFINISHED = ("Queued", "Locked", "Running")
#: What herder's SSH executor says when an instance's SSH server is down or went away.
SSH_ERRORS = ("cannot connect", "connection lost")

#: The container command: ``sh -c SCRIPT MARKER``.  Signals record the end before exiting, so
#: a killed run has an interval too; only SIGKILL leaves a run without an end.
CONTAINER_SCRIPT = r"""
ended() { echo "end $CHAOS_ID $(date +%s%N) $1" >> "$CHAOS_LOG"; }
trap 'kill $! 2>/dev/null; ended signal; exit 143' HUP INT TERM
echo "start $CHAOS_ID $(date +%s%N) $$" >> "$CHAOS_LOG"
sleep "$CHAOS_SLEEP" & wait $!
ended exit
"""

CONFIG = """\
cluster_id: chaos
cloud:
  driver: loopback-chaos
  driver_parameters:
    max_instances: {instances}
    state_dir: {dir}/loopback
  max_instances: {instances}
  deploy_runner_directory: {dir}/runner-bin
  probe_interval: 0.5s
  sync_interval: 1s
  timeout_idle: {timeout_idle}s
  timeout_booting: 60s
  timeout_probe: 60s
  timeout_signal: 2s
  timeout_term: 20s
  timeout_command: 20s
containers:
  runtime_engine: process
  stale_lock_timeout: 15s
queue:
  path: {dir}/herder.db
api:
  listen: 127.0.0.1:0
  management_token: {token}
instance_types:
  local:
    vcpus: {slots}
    ram: 4GiB
    included_scratch: 1GiB
    price: 0.1
"""


# --------------------------------------------------------------------------- options, report


@dataclass(frozen=True)
class ChaosOptions:
    """What one run does.  Every random choice comes from ``seed``."""

    containers: int = 100
    kills: int = 3
    outages: int = 6
    cancels: int = 5
    seed: int = 0
    instances: int = 4
    slots: int = 2  # containers per instance (its vcpus; each container asks for one)
    run_seconds: tuple[float, float] = (0.3, 2.5)
    outage_seconds: tuple[float, float] = (0.5, 3.0)
    downtime_seconds: tuple[float, float] = (0.0, 1.5)
    timeout_idle: float = 3.0
    deadline: float = 900.0  # seconds the whole run may take before it is a failure


@dataclass
class ChaosReport:
    options: ChaosOptions
    faults: dict[str, int]
    checks: list[Check]
    elapsed: float
    directory: Path | None = None  # kept for inspection, if it was
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def format(self) -> str:
        o = self.options
        lines = [
            f"loopback chaos: {o.containers} containers, seed {o.seed}, {o.instances} instances "
            f"x {o.slots} slots, {self.elapsed:.1f}s",
            "faults: " + ", ".join(f"{k} {v}" for k, v in self.faults.items()),
        ]
        lines += [
            f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}" for name, ok, detail in self.checks
        ]
        lines += self.notes
        if self.directory is not None:
            lines.append(f"run directory kept: {self.directory}")
        lines.append("result: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


# --------------------------------------------------------------------------- the dispatcher


class Serve(ServeProcess):
    """``herder serve`` in a child process that injects SSH outages on request."""

    def __init__(self, directory: Path, outage_dir: Path) -> None:
        self.config = directory / "herder.yaml"
        self.outage_dir = outage_dir
        data_dir = directory / "data"
        args = [
            sys.executable,
            str(CHILD),
            str(outage_dir),
            "--log-format",
            "json",
            "serve",
            "--config",
            str(self.config),
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
        ]
        log = directory / "serve.log"
        super().__init__(args, data_dir, lambda: log)

    def killed(self) -> bool:
        """SIGKILL the dispatcher; True if that is what ended it."""
        return self.kill() == -signal.SIGKILL


def call(fn: Callable[[], Any]) -> Any:
    """``fn()``, or None when the dispatcher is down or refuses (it may be restarting)."""
    try:
        return fn()
    except (ClientError, OSError):
        return None


# --------------------------------------------------------------------------- run records


@dataclass
class Run:
    token: str
    start_ns: int
    end_ns: int | None = None
    why: str = ""


def read_runs(path: Path) -> dict[str, list[Run]]:
    """Every run of every container, from the lines the commands appended."""
    runs: dict[str, list[Run]] = {}
    if not path.exists():
        return runs
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) != 4 or not fields[2].isdigit():
            continue  # a line being written right now
        kind, token, ns = fields[0], fields[1], int(fields[2])
        if kind == "start":
            runs.setdefault(token, []).append(Run(token, ns))
        elif kind == "end":
            open_runs = [r for r in runs.get(token, []) if r.end_ns is None]
            if open_runs:
                open_runs[-1].end_ns, open_runs[-1].why = ns, fields[3]
    return runs


def intervals(
    runs: dict[str, list[Run]], uuids: dict[str, str]
) -> Iterator[tuple[str, float, float]]:
    """``(uuid, start, end)`` in seconds; a run that never recorded its end (SIGKILLed) is
    taken to last for ever, so any later run of the same container counts as an overlap."""
    for token, token_runs in runs.items():
        for run in token_runs:
            end = math.inf if run.end_ns is None else run.end_ns / 1e9
            yield uuids.get(token, token), run.start_ns / 1e9, end


# --------------------------------------------------------------------------- processes


def processes_matching(needles: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """``(pid, pgid, cmdline)`` of this host's processes whose command line has a needle."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            pgid = os.getpgid(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
        if any(n in cmdline for n in needles) and int(entry.name) != os.getpid():
            found.append((int(entry.name), pgid, cmdline.strip()))
    return found


def kill_processes(needles: tuple[str, ...]) -> int:
    """SIGKILL every process this run started (found by its unique marker or directory) and
    the process groups they lead or share (a container's ``sleep``); how many were found."""
    found = processes_matching(needles)
    own_group = os.getpgrp()
    for pid, pgid, _ in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgid not in (0, 1, own_group):
                os.killpg(pgid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
    return len(found)


# --------------------------------------------------------------------------- the run


class ChaosRun:
    """One chaos run in ``directory`` (which it fills and leaves for the caller to remove)."""

    def __init__(self, options: ChaosOptions, directory: Path) -> None:
        self.o = options
        self.dir = directory
        self.rng = random.Random(options.seed)
        self.marker = f"chaos{secrets.token_hex(6)}"
        self.runs_path = directory / "runs.log"
        self.outage_dir = directory / "outages"
        self.serve = Serve(directory, self.outage_dir)
        self.uuids: dict[str, str] = {}  # token -> uuid
        self.cancelled: set[str] = set()  # uuids the harness cancelled
        self.faults = {
            "dispatcher SIGKILLs": 0,
            "restarts": 0,
            "SSH outages": 0,
            "SSH outages cut short by a kill": 0,
            "cancels": 0,
        }
        self.notes: list[str] = []
        n = options.containers
        # Faults fire when this many containers have started, so they land while work runs.
        self.kill_at = sorted(self.rng.uniform(0.1, 0.8) * n for _ in range(options.kills))
        self.outage_at = sorted(self.rng.uniform(0.05, 0.7) * n for _ in range(options.outages))
        self.cancel_at = sorted(self.rng.uniform(0.0, 0.9) * n for _ in range(options.cancels))
        self.pending: dict[Path, dict[str, Any]] = {}  # outage requests not yet over
        self.outage_seq = 0

    def run(self) -> ChaosReport:
        began = time.monotonic()
        try:
            self._prepare()
            self.serve.start()
            self._submit_all()
            try:
                self._inject_until_final(began + self.o.deadline)
                left = self._wait_instances_gone()
            except TimeoutError as exc:  # the checks below say what is stuck
                self.notes.append(f"gave up: {exc}")
                left = self._instances_left()
            status = self.serve.stop()
            checks = self._checks(left, status)
        finally:
            self.serve.force_stop()
            leftovers = kill_processes(self._needles())
            if leftovers:
                self.notes.append(f"cleanup killed {leftovers} leftover processes")
        return ChaosReport(self.o, self.faults, checks, time.monotonic() - began, notes=self.notes)

    # ----------------------------------------------------------------- setup

    def _prepare(self) -> None:
        self.outage_dir.mkdir(parents=True)
        self.serve.config.write_text(
            CONFIG.format(
                instances=self.o.instances,
                slots=self.o.slots,
                dir=self.dir,
                timeout_idle=self.o.timeout_idle,
                token=secrets.token_urlsafe(24),
            )
        )

    def _needles(self) -> tuple[str, ...]:
        return (self.marker, str(self.dir))

    def _submit_all(self) -> None:
        for i in range(self.o.containers):
            token = f"c{i:05d}"
            seconds = round(self.rng.uniform(*self.o.run_seconds), 2)
            spec = {
                "command": ["sh", "-c", CONTAINER_SCRIPT, self.marker],
                "runtime": "process",
                "name": f"{self.marker} {token}",
                "environment": {
                    "CHAOS_ID": token,
                    "CHAOS_LOG": str(self.runs_path),
                    "CHAOS_SLEEP": str(seconds),
                },
                "runtime_constraints": {"vcpus": 1, "ram": 64 << 20},
            }
            assert self.serve.client is not None
            self.uuids[token] = self.serve.client.submit(spec)["uuid"]

    # ----------------------------------------------------------------- faults

    def _inject_until_final(self, deadline: float) -> None:
        next_check = 0.0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"containers not final after {self.o.deadline:.0f}s")
            runs = read_runs(self.runs_path)
            started = len(runs)
            running = [t for t, rs in runs.items() if rs[-1].end_ns is None]
            self._collect_outages()
            if self.kill_at and started >= self.kill_at[0] and running and self._settled():
                self.kill_at.pop(0)
                self._kill_and_restart()
                continue
            if self.outage_at and started >= self.outage_at[0]:
                self._request_outage()
            if self.cancel_at and started >= self.cancel_at[0]:
                self._cancel_one(runs)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                if self._all_final():
                    self._finish_outages()
                    return
            time.sleep(0.1)

    def _settled(self) -> bool:
        """The dispatcher had a moment since its last start (kills spaced by real work)."""
        return time.monotonic() - self.serve.started_at > 1.0

    def _kill_and_restart(self) -> None:
        if self.serve.killed():
            self.faults["dispatcher SIGKILLs"] += 1
        self._outages_cut_short()
        time.sleep(self.rng.uniform(*self.o.downtime_seconds))
        self.serve.start()
        self.faults["restarts"] += 1

    def _request_outage(self) -> None:
        """Ask the dispatcher to take down the SSH server of an instance running containers."""
        client = self.serve.client
        listed = call(client.instances) if client is not None else None
        if not listed:
            return
        down = {doc["instance"] for doc in self.pending.values()}
        busy = sorted(
            i["instance"]
            for i in listed
            if i["running_container_uuids"] and i["instance"] not in down
        )
        candidates = busy or sorted(
            i["instance"] for i in listed if i["instance"] and i["instance"] not in down
        )
        if not candidates:
            return
        self.outage_at.pop(0)
        self.outage_seq += 1
        request = self.outage_dir / f"{self.outage_seq:04d}.request"
        doc = {
            "instance": self.rng.choice(candidates),
            "seconds": round(self.rng.uniform(*self.o.outage_seconds), 2),
        }
        tmp = request.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, request)
        self.pending[request] = doc

    def _collect_outages(self) -> None:
        """Count the outages that are over; one whose instance was gone is asked for again."""
        for request in list(self.pending):
            done = request.with_suffix(".done")
            if not done.exists():
                continue
            result = json.loads(done.read_text())
            del self.pending[request]
            if result["stopped"] and result["started"]:
                self.faults["SSH outages"] += 1
            else:
                self.outage_at.insert(0, 0.0)

    def _outages_cut_short(self) -> None:
        """After a kill: an outage the dead dispatcher had begun and not ended is cut short
        (the new one starts every SSH server); one it had not taken yet waits for the next."""
        self._collect_outages()
        for request in list(self.pending):
            if request.with_suffix(".taken").exists():
                del self.pending[request]
                self.faults["SSH outages cut short by a kill"] += 1
                self.outage_at.insert(0, 0.0)

    def _finish_outages(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            self._collect_outages()
            time.sleep(0.1)

    def _cancel_one(self, runs: dict[str, list[Run]]) -> None:
        """Cancel a container that has not finished (running or still queued)."""
        client = self.serve.client
        candidates = [
            u
            for t, u in sorted(self.uuids.items())
            if u not in self.cancelled and not (runs.get(t) and runs[t][-1].end_ns)
        ]
        if client is None or not candidates:
            return
        uuid = self.rng.choice(candidates)
        result = call(lambda: client.cancel(uuid, CANCEL_REASON))
        if result is not None and result.get("state") == "Cancelled":  # not finished first
            self.cancel_at.pop(0)
            self.cancelled.add(uuid)
            self.faults["cancels"] += 1

    def _all_final(self) -> bool:
        client = self.serve.client
        if client is None:
            return False
        unfinished = call(lambda: list(client.iter_containers(UNFINISHED, limit=1)))
        return isinstance(unfinished, list) and not unfinished

    # ----------------------------------------------------------------- the end

    def _instances_left(self) -> list[str]:
        client = self.serve.client
        listed = call(client.instances) if client is not None else None
        api = [str(i["instance"]) for i in listed or []]
        on_disk = [p.name for p in (self.dir / "loopback" / "instances").glob("*")]
        return sorted(set(api) | set(on_disk)) if listed is not None else ["(API unreachable)"]

    def _wait_instances_gone(self) -> list[str]:
        """Wait out the idle timeout (and the probes and syncs around it)."""
        deadline = time.monotonic() + self.o.timeout_idle + 30
        while (left := self._instances_left()) and time.monotonic() < deadline:
            time.sleep(0.25)
        return left

    def _ssh_errors_logged(self) -> int:
        """SSH commands herder logged as failed: evidence that the outages were felt."""
        count = 0
        for line in self.serve.log_path().read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                doc = json.loads(line)
                message = str(doc.get("message", ""))
                if (
                    doc.get("level") in ("warning", "error")
                    and str(doc.get("logger", "")).startswith("herder.engine.worker")
                    and any(s in message for s in SSH_ERRORS)
                ):
                    count += 1
        return count

    def _checks(self, left: list[str], serve_status: int) -> list[Check]:
        db = self.dir / "herder.db"
        runs = read_runs(self.runs_path)
        self.faults["SSH errors herder logged"] = self._ssh_errors_logged()
        required = (
            ["dispatcher SIGKILLs"] * bool(self.o.kills)
            + ["SSH outages", "SSH errors herder logged"] * bool(self.o.outages)
            + ["cancels"] * bool(self.o.cancels)
        )
        return [
            every_container_final(db, expected=self.o.containers),
            no_overlapping_runs(intervals(runs, self.uuids)),
            self._uncancelled_completed(db, runs),
            (
                "no instance left behind",
                not left,
                f"left: {', '.join(left)}" if left else "API and state directory empty",
            ),
            self._no_processes_left(),
            queue_integrity(db),
            faults_injected(self.faults, required),
            self._faults_as_requested(),
            (
                "herder serve stopped cleanly on SIGTERM",
                serve_status == 0,
                f"exit status {serve_status}",
            ),
        ]

    def _uncancelled_completed(self, db: Path, runs: dict[str, list[Run]]) -> Check:
        """A container nobody cancelled must end Complete, exit 0, after one full run."""
        tokens = {u: t for t, u in self.uuids.items()}
        wrong, reruns = [], 0
        for uuid, state, code, status in queue_rows(db):
            if uuid in self.cancelled:
                continue
            token_runs = runs.get(tokens.get(uuid, ""), [])
            reruns += max(0, len(token_runs) - 1)
            if state != "Complete" or code != 0:
                wrong.append(f"{uuid} {state} exit {code} {status}")
            elif not any(r.why == "exit" for r in token_runs):
                wrong.append(f"{uuid} Complete without a finished run")
        detail = f"{len(self.uuids) - len(self.cancelled)} checked, {reruns} reruns"
        if wrong:
            detail += "; " + "; ".join(wrong[:5])
        return ("every container not cancelled completed a full run, exit 0", not wrong, detail)

    def _no_processes_left(self) -> Check:
        found = processes_matching(self._needles())
        detail = "; ".join(cmd[:80] for _, _, cmd in found[:5]) or "none"
        return "no container or runner process left running", not found, detail

    def _faults_as_requested(self) -> Check:
        got = (
            self.faults["dispatcher SIGKILLs"],
            self.faults["SSH outages"],
            self.faults["cancels"],
        )
        want = (self.o.kills, self.o.outages, self.o.cancels)
        return (
            "every requested fault was injected (kills, SSH outages, cancels)",
            got == want,
            f"{got} of {want}",
        )


# --------------------------------------------------------------------------- entry points


def run_chaos(options: ChaosOptions, directory: Path | None = None) -> ChaosReport:
    """Run once.  Without ``directory`` a temporary one is used, removed unless the run failed."""
    owned = directory is None
    workdir = Path(tempfile.mkdtemp(prefix="herder-chaos-")) if directory is None else directory
    report: ChaosReport | None = None
    try:
        report = ChaosRun(options, workdir).run()
        return report
    finally:
        if owned and report is not None and report.ok:
            shutil.rmtree(workdir, ignore_errors=True)
        elif owned and report is not None:
            report.directory = workdir
        elif owned:
            print(f"run directory kept: {workdir}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> tuple[ChaosOptions, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--containers", type=int, default=100)
    p.add_argument("--kills", type=int, default=3, help="dispatcher SIGKILLs")
    p.add_argument(
        "--outages",
        type=int,
        default=None,
        help="SSH outages (default: twice the kills, at least 2)",
    )
    p.add_argument(
        "--cancels",
        type=int,
        default=None,
        help="containers cancelled through the API (default: 1 in 20)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--keep", action="store_true", help="keep the run directory even on success")
    a = p.parse_args(argv)
    outages = a.outages if a.outages is not None else max(2, 2 * a.kills)
    cancels = a.cancels if a.cancels is not None else a.containers // 20
    return ChaosOptions(
        containers=a.containers,
        kills=a.kills,
        outages=outages,
        cancels=cancels,
        seed=a.seed,
        instances=a.instances,
    ), a.keep


def _exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, CI cancelling a job) unwinds the run, so its cleanup still runs."""

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def main(argv: list[str] | None = None) -> int:
    _exit_on_sigterm()
    options, keep = parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="herder-chaos-")) if keep else None
    report = run_chaos(options, directory)
    if directory is not None:
        report.directory = directory
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
