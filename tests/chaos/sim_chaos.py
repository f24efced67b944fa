"""Chaos run on the sim driver: every fault on, and the dispatcher killed with SIGKILL.

``herder serve`` runs as a subprocess on a simulated cloud kept in a state file, so the cloud
(its instances and container processes) keeps running while the dispatcher is dead, as a real
cloud would.  The harness submits the containers through the management API, kills the
dispatcher with SIGKILL at seeded random moments and starts it again, waits until the queue is
empty and the idle timeout has passed, stops it, and then checks the invariants of
:mod:`invariants` against the queue file and the simulated cloud.

Long form, by hand (prints the report, exits non-zero on any failure)::

    uv run python tests/chaos/sim_chaos.py --containers 1000 --kills 3 --seed 1

The short form is ``test_sim_chaos.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import invariants
from invariants import Check
from serve_process import ServeProcess

from herder.app.client import Client, ClientError
from herder.model import InstanceType
from herder.testing.sim_cloud import SimCloud
from herder.testing.sim_params import SimParameters
from herder.testing.sim_stats import FAULT_KINDS
from herder.testing.sim_store import read_processes

HERDER = [sys.executable, "-m", "herder.app.cli"]

#: The fault kinds every run must see, by the names SimStats counts them under.
#: Also on, reported, and required by the long form (a short run may miss them).
EXTRA_FAULTS = ("destroy_error", "stale_lock")
REQUIRED_FAULTS = tuple(kind for kind in FAULT_KINDS if kind not in EXTRA_FAULTS)

#: Large instances the simulated cloud has capacity for.
LARGE_CAPACITY = 2

#: Every fault on, at rates that make each kind fire in a run of about a hundred containers
#: (with a seed from :func:`choose_seed`) while the engine's retries still get every container
#: done.  Timings are seconds, so that a run takes about as long as its containers.
DRIVER_PARAMETERS: dict[str, Any] = {
    "faults": True,
    "boot_delay": [0.5, 1.5],
    "destroy_delay": [0.0, 0.5],
    "kill_delay": 0.5,
    "create_error_rate": 0.15,
    "destroy_error_rate": 0.2,
    # A capacity error holds creates of its type for a minute (as in Arvados): random ones
    # could stop all progress of a short run, so capacity runs out for large instances only,
    # once two exist (the queue starts with more large containers than that).
    "capacity_error_rate": 0.0,
    "capacity_max_instances": {"b.large": LARGE_CAPACITY},
    # Below cloud.max_instances: the dispatcher runs into the quota whenever the queue is long.
    "quota_max_instances": 6,
    # Longer than the sync interval: every other listing is refused.
    "min_time_between_list_calls": 1.5,
    "min_time_between_create_calls": 0.3,
    "never_boot_rate": 0.1,
    "broken_rate": 0.1,
    "broken_after": [0.5, 3.0],
    "disappear_rate": 0.1,
    # Soon after create: before the dispatcher could shut the instance down for any reason.
    "disappear_after": [1.0, 3.0],
    "runner_crash_rate": 0.06,
    "ssh_failure_rate": 0.01,
    # Low: each stale lock makes its instance report broken after timeout_stale_run_lock.
    "stale_lock_rate": 0.015,
    "runner_missing": True,
}
#: The first instances a run creates, whose fates :func:`choose_seed` looks at: a short run
#: creates at least this many.
EARLY_INSTANCES = LARGE_CAPACITY + 4

CONFIG = """\
cluster_id: chaos
containers:
  max_dispatch_attempts: 10
  stale_lock_timeout: 2s
cloud:
  driver: sim
  driver_parameters: {driver_parameters}
  poll_interval: 0.5s
  probe_interval: 0.3s
  max_probes_per_second: 500
  sync_interval: 1s
  timeout_idle: {idle}s
  timeout_booting: 5s
  timeout_probe: 5s
  timeout_shutdown: 2s
  timeout_term: 5s
  timeout_signal: 1s
  timeout_stale_run_lock: 2s
  timeout_command: 5s
  max_cloud_ops_per_second: 0
  max_concurrent_instance_create_ops: 4
  max_instances: 14
queue:
  path: {queue}
api:
  listen: 127.0.0.1:0
  management_token: {token}
instance_types:
  small:
    provider_type: a.small
    vcpus: 4
    ram: 4GiB
    price: 0.05
  large:
    provider_type: b.large
    vcpus: 16
    ram: 32GiB
    price: 0.2
"""


@dataclass
class ChaosOptions:
    """One run's knobs; the defaults are the long form's."""

    containers: int = 1000
    kills: int = 3
    seed: int = 1
    #: Run time of each container, drawn uniformly (seconds).
    duration: tuple[float, float] = (0.2, 2.0)
    #: Seconds a killed dispatcher stays dead before it is started again (drawn uniformly).
    downtime: tuple[float, float] = (0.0, 1.0)
    #: A dispatcher lives at least this long before it is killed (seconds).
    min_uptime: float = 2.0
    idle_timeout: float = 3.0
    #: Give up waiting for the queue to drain after this long (seconds).
    timeout: float = 1800.0
    workdir: Path | None = None
    required_faults: tuple[str, ...] = REQUIRED_FAULTS + EXTRA_FAULTS
    quiet: bool = False
    #: Keep the work directory after a run that passed (it is always kept after a failure).
    keep: bool = False


@dataclass
class ChaosReport:
    """What a run did and found."""

    options: ChaosOptions
    workdir: Path
    kills: list[float] = field(default_factory=list)
    starts: int = 0
    elapsed: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def text(self) -> str:
        o = self.options
        lines = [
            f"sim chaos: {o.containers} containers, seed {o.seed}, {len(self.kills)} SIGKILLs "
            f"(at {', '.join(f'{t:.1f}s' for t in self.kills) or '-'}), "
            f"{self.starts} dispatcher starts, {self.elapsed:.1f}s",
            f"work directory: {self.workdir}",
            "faults injected:",
        ]
        kinds = list(dict.fromkeys([*o.required_faults, *sorted(self.faults)]))
        for kind in kinds:
            mark = "" if kind in o.required_faults else "  (not required)"
            lines.append(f"  {kind:<14} {self.faults.get(kind, 0):>6}{mark}")
        s = self.stats
        if s:
            lines.append(
                f"cloud: {s['created']} instances created, {s['destroyed']} destroyed, "
                f"{s['disappeared']} vanished; {s['container_starts']} container starts, "
                f"{s['container_completions']} exits, {s['container_crashes']} crashes"
            )
        lines.append("invariants:")
        for name, ok, detail in self.checks:
            lines.append(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        lines.append("RESULT: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


# --------------------------------------------------------------------------- the dispatcher


class Dispatcher(ServeProcess):
    """``herder serve`` with the run's configuration; each start logs to a file of its own."""

    def __init__(self, workdir: Path, config: Path) -> None:
        super().__init__(
            [*HERDER, "--log-format", "json", "serve", "--config", str(config)],
            workdir / "data",
            lambda: workdir / f"serve-{self.starts}.log",
        )
        self.starts = 0

    def start(self, timeout: float = 60.0) -> Client:
        self.starts += 1
        return super().start(timeout)


# --------------------------------------------------------------------------- the run


def write_config(workdir: Path, seed: int, idle: float) -> tuple[Path, Path, Path]:
    """The configuration file; returns (config, queue file, sim state file)."""
    queue = workdir / "queue.db"
    state = workdir / "sim-state.db"
    params = {**DRIVER_PARAMETERS, "seed": seed, "state_file": str(state)}
    config = workdir / "herder.yaml"
    config.write_text(
        CONFIG.format(
            driver_parameters=json.dumps(params),
            idle=idle,
            queue=json.dumps(str(queue)),
            token=secrets.token_hex(16),
        )
    )
    return config, queue, state


def early_fates(seed: int, count: int = EARLY_INSTANCES) -> list[str]:
    """The fault each of a run's first ``count`` instances is born with ("" for none): the
    one that shows first, as one that vanishes before it breaks is never seen broken.

    An instance's fate is drawn from its own generator, seeded by the cloud's seed and its id,
    so it does not depend on timing: built here with the sim cloud's own code.
    """
    params = SimParameters.model_validate({**DRIVER_PARAMETERS, "seed": seed})
    cloud = SimCloud(seed=seed)
    small = InstanceType("small", "a.small", vcpus=2, ram=4 << 30)
    fates = []
    for _ in range(count):
        vm = cloud.add_vm(params, small, "", {}, "", None, 0.0)
        if vm.boot_at == math.inf:
            fates.append("never_boot")
        elif vm.broken_at < vm.vanish_at:
            fates.append("broken")
        elif vm.vanish_at < math.inf:
            fates.append("disappear")
        else:
            fates.append("")
    return fates


def choose_seed(first: int) -> int:
    """The first seed from ``first`` on with which a short run injects every fault kind.

    Most kinds fire many times in any run; the ones that happen to an instance, or once per
    create call, may not in a short one.  With this seed the run's very first create call fails
    (it is the first draw of the cloud's generator); its first instances, the large ones of the
    first wave (:func:`submit_all`), are sound; and the next ones include one that never boots,
    one that breaks and one that vanishes (one of each).
    """
    rate = DRIVER_PARAMETERS["create_error_rate"]
    wanted = {"never_boot", "broken", "disappear"}
    for seed in range(first, first + 100_000):
        fates = early_fates(seed)
        first_sound = not any(fates[:LARGE_CAPACITY])
        # One of each, no more: instances that never boot hold quota for timeout_booting.
        faults = sorted(f for f in fates if f)
        if random.Random(seed).random() < rate and first_sound and faults == sorted(wanted):
            return seed
    raise ValueError("no seed makes every fault fire early")


def submission(rng: random.Random, duration: tuple[float, float], large: bool) -> dict[str, Any]:
    """One container: ``sim <seconds> <code>``, mostly exit 0; a large one needs a large
    instance (one container per instance)."""
    seconds = rng.uniform(*duration)
    code = 0 if rng.random() < 0.9 else rng.choice((1, 2, 3))
    return {
        "command": ["sim", f"{seconds:.2f}", str(code)],
        "runtime_constraints": {"vcpus": 12 if large else 1, "ram": (16 if large else 1) << 30},
    }


def submit_all(client: Client, rng: random.Random, options: ChaosOptions, state: Path) -> list[str]:
    """The workload, in two waves.

    First one large container more than the cloud has capacity for, alone in the queue: the
    dispatcher creates large instances until a capacity error (before anything else can bring
    the quota into play).  Then the rest, 5% of them large.
    """
    head = min(LARGE_CAPACITY + 1, options.containers)
    uuids = [client.submit(submission(rng, options.duration, True))["uuid"] for _ in range(head)]
    wait_for_fault(state, "capacity", timeout=20.0)
    for _ in range(options.containers - head):
        large = rng.random() < 0.05
        uuids.append(client.submit(submission(rng, options.duration, large))["uuid"])
    return uuids


def cloud_faults(state: Path) -> dict[str, int]:
    """The fault counters of the simulated cloud, read without taking the cloud."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'stats'").fetchone()
    except sqlite3.OperationalError:
        return {}  # not created yet
    finally:
        db.close()
    return dict(json.loads(row[0])["faults"]) if row else {}


def wait_for_fault(state: Path, kind: str, timeout: float) -> bool:
    """Wait until the simulated cloud injected a fault of ``kind`` (False: it did not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.exists() and cloud_faults(state).get(kind, 0) > 0:
            return True
        time.sleep(0.1)
    return False


def queue_progress(queue: Path) -> tuple[int, int]:
    """(final, total) containers in the queue file, read while the dispatcher runs."""
    db = sqlite3.connect(f"file:{queue}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT state, count(*) FROM containers GROUP BY state").fetchall()
    finally:
        db.close()
    total = sum(n for _, n in rows)
    final = sum(n for state, n in rows if state in invariants.FINAL_STATES)
    return final, total


def listed_instances(state: Path) -> int:
    """Instances still in the simulated cloud's listing now, read without taking the cloud."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT data FROM vms").fetchall()
    finally:
        db.close()
    now = time.time()
    return sum(1 for (text,) in rows if now < json.loads(text)["gone_at"])


def kill_thresholds(rng: random.Random, kills: int) -> list[float]:
    """Fractions of the queue done at which the dispatcher is killed (seeded, increasing)."""
    return sorted(rng.uniform(0.05, 0.85) for _ in range(kills))


@contextmanager
def workdir_for(options: ChaosOptions) -> Iterator[Path]:
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        yield options.workdir
        return
    yield Path(tempfile.mkdtemp(prefix="herder-sim-chaos-"))


def run(options: ChaosOptions) -> ChaosReport:
    """One chaos run; the report says what happened and which invariants held."""
    rng = random.Random(options.seed)
    with workdir_for(options) as workdir:
        report = ChaosReport(options, workdir)
        config, queue, state = write_config(workdir, options.seed, options.idle_timeout)
        dispatcher = Dispatcher(workdir, config)
        began = time.monotonic()
        try:
            client = dispatcher.start()
            submit_all(client, rng, options, state)
            _run_with_kills(dispatcher, queue, state, rng, options, report, began)
        finally:
            dispatcher.stop()
            report.starts = dispatcher.starts
            report.elapsed = time.monotonic() - began
        _check(report, queue, state)
        return report


def _say(options: ChaosOptions, message: str) -> None:
    if not options.quiet:
        print(message, file=sys.stderr, flush=True)


def _run_with_kills(
    dispatcher: Dispatcher,
    queue: Path,
    state: Path,
    rng: random.Random,
    options: ChaosOptions,
    report: ChaosReport,
    began: float,
) -> None:
    """Kill at the seeded moments, then wait for the queue to drain and instances to go."""
    thresholds = kill_thresholds(rng, options.kills)
    started_at = time.monotonic()
    deadline = began + options.timeout
    drained_at: float | None = None
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if not dispatcher.alive():
            raise RuntimeError(f"herder serve died on its own:\n{dispatcher.log_tail()}")
        final, total = queue_progress(queue)
        up = time.monotonic() - started_at
        if thresholds and final >= thresholds[0] * total and up >= options.min_uptime:
            thresholds.pop(0)
            dispatcher.kill()
            report.kills.append(time.monotonic() - began)
            _say(options, f"SIGKILL at {report.kills[-1]:.1f}s ({final}/{total} final)")
            time.sleep(rng.uniform(*options.downtime))
            dispatcher.start()
            started_at = time.monotonic()
            continue
        if final < total or thresholds:
            drained_at = None
            continue
        if drained_at is None:
            drained_at = time.monotonic()
            _say(options, f"queue drained at {drained_at - began:.1f}s")
        idle_passed = time.monotonic() - drained_at > options.idle_timeout + 1.0
        if idle_passed and listed_instances(state) == 0:
            return
        # Instances may take a few destroy retries (injected errors) after the idle timeout.
        if time.monotonic() - drained_at > options.idle_timeout + 60.0:
            return


def _check(report: ChaosReport, queue: Path, state: Path) -> None:
    options = report.options
    checks = report.checks
    checks.append(
        (
            "dispatcher killed with SIGKILL and restarted",
            len(report.kills) >= options.kills,
            f"{len(report.kills)} kills, {options.kills} planned",
        )
    )
    checks.append(invariants.every_container_final(queue, expected=options.containers))
    checks.append(invariants.queue_integrity(queue))
    processes = read_processes(state)
    checks.append(
        invariants.no_overlapping_runs((p.uuid, p.started_at, p.ended_at) for p in processes)
    )
    cloud = SimCloud(state_file=str(state))
    checks.append(invariants.no_double_runs_detected(cloud))
    checks.append(invariants.no_instances_left(cloud))
    checks.append(invariants.exit_codes_are_real(queue, processes))
    report.faults = dict(cloud.stats.faults)
    report.stats = cloud.stats.to_json()
    checks.append(invariants.faults_injected(report.faults, options.required_faults))


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> ChaosOptions:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--containers", type=int, default=1000)
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs of the dispatcher (>= 3)")
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="the run uses the first seed from this one on that makes every fault kind fire "
        "early (see choose_seed); --exact-seed uses it as it is",
    )
    p.add_argument("--exact-seed", action="store_true", help="use --seed as it is")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after (seconds)")
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory on success")
    args = p.parse_args(argv)
    return ChaosOptions(
        containers=args.containers,
        kills=args.kills,
        seed=args.seed if args.exact_seed else choose_seed(args.seed),
        timeout=args.timeout,
        workdir=args.workdir,
        keep=args.keep or args.workdir is not None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        report = run(options)
    except (RuntimeError, ClientError) as exc:
        print(f"sim chaos: run failed: {exc}", file=sys.stderr)
        return 2
    print(report.text())
    if report.ok and not options.keep:
        shutil.rmtree(report.workdir, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
