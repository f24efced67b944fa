"""herder beside Slurm on this machine: the same trivial jobs on the same number of slots.

    uv run python benchmarks/slurm_compare.py --jobs 500 --slots 8
    uv run python benchmarks/slurm_compare.py --jobs 300 --slots 8 --repeat 3
    uv run python benchmarks/slurm_compare.py --only slurm --array

Slurm: a private cluster in a temporary directory (slurmctld and one slurmd per node, each
node ``--per-instance`` CPUs, on free ports of 127.0.0.1), with the tuned SchedulerParameters
(without them Slurm schedules on its own idle timers and the comparison measures those).
Each job is ``sbatch -o /dev/null -e /dev/null --wrap true`` (or one ``--array`` job with
``--array``); the clock runs from the first submission until ``squeue`` lists none of them.

herder: an in-process dispatcher on loopback instances of the same shape (``--slots`` divided
into instances of ``--per-instance`` VCPUs) running the same number of ``true`` containers,
timed from the first submission to the last Complete.  Both sides first run one untimed job
per slot: it boots herder's instances and deploys its runner, and starts each slurmd's first
job, so neither clock includes start-up.

herder runs with its configuration's defaults (``probe_interval`` 10 s, ``max_probes_per_second``
10): the resident runner agent reports each exit as it happens, so the probe cadence is not on
the path.  ``--probe-interval`` and ``--max-probes-per-second`` change them.

The two sides run one after the other, never at once, so each has the whole machine.  Needs
root and Debian's packages slurmctld, slurmd, slurm-client and munge for the Slurm side.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from herder_dispatcher_slurm.localcluster import (
    TUNED_SCHEDULER_PARAMETERS,
    LocalSlurm,
    SlurmSetupError,
    missing_prerequisites,
    tool,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loopback_harness import Bench
from throughput import run_batch, warm_up

GOAL = 5.0


@dataclass(frozen=True)
class Run:
    """One timed batch on either side."""

    jobs: int
    elapsed: float
    submit: float | None
    not_complete: int

    @property
    def rate(self) -> float:
        return self.jobs / self.elapsed


# ------------------------------------------------------------------------------------- Slurm


def squeue(*args: str, attempts: int = 20) -> list[str]:
    """squeue's lines; a busy slurmctld can fail a query (socket time-out), so retry a few."""
    for _ in range(attempts - 1):
        proc = tool("squeue", "--noheader", *args)
        if proc.returncode == 0:
            return proc.stdout.splitlines()
        print(f"  squeue failed, retrying: {proc.stderr.strip()}", file=sys.stderr, flush=True)
        time.sleep(0.5)
    return tool("squeue", "--noheader", *args, check=True).stdout.splitlines()


def submit_slurm(name: str, jobs: int, array: bool) -> None:
    base = ["sbatch", "--quiet", "-J", name, "-o", "/dev/null", "-e", "/dev/null"]
    if array:
        tool(*base, f"--array=1-{jobs}", "--wrap", "true", check=True)
        return
    for _ in range(jobs):
        tool(*base, "--wrap", "true", check=True)


def slurm_batch(name: str, jobs: int, array: bool, poll: float) -> Run:
    """Submit, then poll squeue until none of the batch is pending, running or completing.

    Finished jobs stay in slurmctld for MinJobAge, which is what lets the batch's outcomes be
    counted afterwards (``--states=all``) without accounting.
    """
    t0 = time.perf_counter()
    submit_slurm(name, jobs, array)
    submitted = time.perf_counter() - t0
    while squeue("--name", name, "--format=%i"):
        time.sleep(poll)
    elapsed = time.perf_counter() - t0
    states = Counter(squeue("--states=all", "--array", "--name", name, "--format=%T"))
    return Run(jobs, elapsed, submitted, jobs - states["COMPLETED"])


def run_slurm(args: argparse.Namespace) -> list[Run]:
    nodes = args.slots // args.per_instance
    directory = Path(tempfile.mkdtemp(prefix="herder-slurm-bench-"))
    cluster = LocalSlurm(
        directory,
        nodes=nodes,
        cpus_per_node=args.per_instance,
        real_memory_mb=1000,
        scheduler_parameters=args.scheduler_parameters,
        min_job_age=300,
        max_jobs=args.jobs * args.repeat + args.slots,
        cluster_name="herderbench",
    )
    runs = []
    try:
        t0 = time.perf_counter()
        cluster.start()
        slurm_batch("warmup", args.slots, False, args.poll)
        print(
            f"Slurm: {nodes} nodes idle and warmed up {time.perf_counter() - t0:.1f} s "
            f"after start (SchedulerParameters={args.scheduler_parameters or 'default'})",
            flush=True,
        )
        for k in range(args.repeat):
            run = slurm_batch(f"bench{k}", args.jobs, args.array, args.poll)
            runs.append(run)
            print(
                f"  Slurm  run {k + 1}: {run.jobs} jobs in {run.elapsed:.1f} s "
                f"(submitted in {run.submit:.1f} s), {run.rate:.1f} jobs/s"
                + (f", {run.not_complete} not COMPLETED" if run.not_complete else ""),
                flush=True,
            )
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return runs


# ------------------------------------------------------------------------------------ herder


def run_herder(args: argparse.Namespace) -> list[Run]:
    instances = args.slots // args.per_instance
    probes = args.max_probes_per_second
    bench = Bench(
        instances=instances,
        vcpus=args.per_instance,
        probe_interval=args.probe_interval,
        extra_cloud={"max_probes_per_second": probes},
    )
    runs = []
    try:
        t0 = time.perf_counter()
        bench.start()
        warm_up(bench, args.slots)
        print(
            f"herder: {instances} loopback instances warmed up "
            f"{time.perf_counter() - t0:.1f} s after start "
            f"(probe_interval {args.probe_interval} s, "
            f"max_probes_per_second {probes:g})",
            flush=True,
        )
        for k in range(args.repeat):
            result = run_batch(bench, args.jobs)
            run = Run(args.jobs, result.elapsed, None, result.not_complete)
            runs.append(run)
            print(
                f"  herder run {k + 1}: {run.jobs} containers in {run.elapsed:.1f} s, "
                f"{run.rate:.1f} jobs/s"
                + (f", {run.not_complete} not Complete" if run.not_complete else ""),
                flush=True,
            )
    finally:
        bench.close()
    return runs


# -------------------------------------------------------------------------------------- main


def median_rate(runs: list[Run]) -> float:
    return statistics.median(r.rate for r in runs)


def report(args: argparse.Namespace, slurm: list[Run], herder: list[Run]) -> None:
    mode = "one array job" if args.array else "one sbatch per job"
    tuning = "tuned" if args.scheduler_parameters == TUNED_SCHEDULER_PARAMETERS else "custom"
    if not args.scheduler_parameters:
        tuning = "default scheduler"
    of = f"median of {args.repeat}" if args.repeat > 1 else "one run"
    print()
    if slurm:
        print(f"Slurm ({tuning}, {mode}): {median_rate(slurm):.2f} jobs/s ({of})")
    if herder:
        print(f"herder (loopback):  {median_rate(herder):.2f} jobs/s ({of})")
    if slurm and herder:
        ratio = median_rate(herder) / median_rate(slurm)
        met = "met" if ratio >= GOAL else "not met"
        print(f"ratio herder/Slurm: {ratio:.2f}x (goal >= {GOAL:.0f}x: {met})")
    failed = sum(r.not_complete for r in slurm + herder)
    if failed:
        print(f"warning: {failed} jobs did not complete successfully; the rates are suspect")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=500, help="trivial jobs per run (default 500)")
    ap.add_argument("--slots", type=int, default=8, help="job slots on each side (default 8)")
    ap.add_argument(
        "--per-instance",
        type=int,
        default=1,
        metavar="N",
        help="slots per Slurm node and per herder instance (default 1: --slots nodes of 1 CPU)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="K",
        help="runs per side; the medians are compared (default 1)",
    )
    ap.add_argument("--only", choices=("slurm", "herder"), help="run one side only")
    ap.add_argument(
        "--array",
        action="store_true",
        help="Slurm: submit one --array job instead of one sbatch per job",
    )
    ap.add_argument(
        "--scheduler-parameters",
        default=TUNED_SCHEDULER_PARAMETERS,
        help="Slurm's SchedulerParameters ('' for Slurm's defaults; default: %(default)s)",
    )
    ap.add_argument(
        "--poll", type=float, default=0.1, help="seconds between squeue polls (default 0.1)"
    )
    ap.add_argument(
        "--probe-interval",
        type=float,
        default=10.0,
        help="herder's probe_interval (default 10 s, the configuration default)",
    )
    ap.add_argument(
        "--max-probes-per-second",
        type=float,
        default=10.0,
        metavar="RATE",
        help="herder's probe rate limit (default 10, the configuration default)",
    )
    args = ap.parse_args()
    if args.jobs < 1 or args.repeat < 1 or args.per_instance < 1:
        ap.error("--jobs, --repeat and --per-instance must be positive")
    if args.slots < args.per_instance or args.slots % args.per_instance:
        ap.error(f"--slots {args.slots} is not a multiple of --per-instance {args.per_instance}")
    return args


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into an exception so that the finally blocks stop every daemon started."""
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = parse_args()
    if args.only != "herder":
        problem = missing_prerequisites()
        if problem:
            print(f"cannot run the Slurm side: {problem}", file=sys.stderr)
            print("(use --only herder to run herder's side alone)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    shape = f"{args.slots // args.per_instance} x {args.per_instance}"
    sides = [f"Slurm {shape} (nodes x CPUs)"] if args.only != "herder" else []
    if args.only != "slurm":
        sides.append(f"herder {shape} (loopback instances x VCPUs)")
    print(f"{args.jobs} trivial jobs per run, {args.slots} slots: {', '.join(sides)}", flush=True)
    slurm: list[Run] = []
    herder: list[Run] = []
    try:
        if args.only != "herder":
            slurm = run_slurm(args)
        if args.only != "slurm":
            herder = run_herder(args)
    except SlurmSetupError as e:
        print(f"cannot start Slurm: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"{' '.join(map(str, e.cmd))} failed: {(e.stderr or '').strip()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every daemon started here has been stopped", file=sys.stderr)
        return 130
    report(args, slurm, herder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
