"""Throughput on loopback: trivial containers through 8 instances, several per instance.

    uv run python benchmarks/throughput.py --containers 2000 --instances 8 --per-instance 4
    uv run python benchmarks/throughput.py --profile /tmp/herder-throughput.prof

All containers are submitted at once (``true``, one VCPU each, instances with ``--per-instance``
VCPUs); the clock runs from the first submission to the last Complete.  A warm-up round boots
instances and deploys the runner first.

Each instance's runner agent is resident and reports every exit as it happens, so results are
collected at once, not at the next ``--list`` probe: the probe settings are the configuration's
defaults (``probe_interval`` 10 s, ``max_probes_per_second`` 10), and ``--probe-interval``
exists to show that they no longer matter.

CPU is reported for the herder process (which here also runs the loopback instances' SSH
servers) and for the whole machine (``/proc/stat``: the runner agents, their supervisors and
the containers are processes herder does not wait for, so ``RUSAGE_CHILDREN`` misses them).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from herder.model import ContainerState

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loopback_harness import Bench


@dataclass(frozen=True)
class BatchResult:
    """One timed batch: wall time from the first submission to the last final state, and CPU."""

    containers: int
    elapsed: float
    own_cpu: float
    children_cpu: float
    not_complete: int
    machine_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.containers / self.elapsed


def cpu_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def machine_cpu_seconds() -> float:
    """CPU time used by every process on the machine so far (busy jiffies of ``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def warm_up(bench: Bench, slots: int) -> None:
    """One container per slot, untimed: boots every instance and deploys the runner first."""
    warm = slots
    done = bench.finished
    for _ in range(warm):
        bench.submit("true")
    bench.wait(lambda: bench.finished >= done + warm, 300)


def run_batch(bench: Bench, containers: int, profile: str | None = None) -> BatchResult:
    """Submit ``containers`` trivial containers at once and time them to their final states.

    Shared by this script and the Slurm comparison, so both measure herder the same way.
    """
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    done = bench.finished
    own0, kids0 = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    machine0 = machine_cpu_seconds()
    t0 = time.perf_counter()
    uuids = [bench.submit("true")[0] for _ in range(containers)]
    bench.wait(lambda: bench.finished >= done + containers, 3600)
    elapsed = time.perf_counter() - t0
    own1, kids1 = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    machine1 = machine_cpu_seconds()
    if prof and profile:
        prof.disable()
        prof.dump_stats(profile)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    complete = sum(bench.state_time(u, ContainerState.COMPLETE) is not None for u in uuids)
    return BatchResult(
        containers, elapsed, own1 - own0, kids1 - kids0, containers - complete, machine1 - machine0
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--containers", type=int, default=2000)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--per-instance", type=int, default=4)
    ap.add_argument("--probe-interval", type=float, default=10.0)
    ap.add_argument("--profile", metavar="FILE", help="cProfile the timed part into FILE")
    args = ap.parse_args()
    bench = Bench(
        instances=args.instances, vcpus=args.per_instance, probe_interval=args.probe_interval
    )
    try:
        bench.start()
        warm_up(bench, args.instances * args.per_instance)
        result = run_batch(bench, args.containers, args.profile)
        used = len(bench.dispatcher.pool.instances())
    finally:
        bench.close()
    print(
        f"{args.containers} containers, {used} instances x {args.per_instance}: "
        f"{result.elapsed:.1f} s, {result.rate:.1f} completed/s"
    )
    print(
        f"CPU per container: herder process {result.own_cpu / args.containers * 1e3:.1f} ms, "
        f"whole machine {result.machine_cpu / args.containers * 1e3:.1f} ms "
        f"(of {os.cpu_count()} CPUs x {result.elapsed:.1f} s)"
    )
    if result.not_complete:
        print(f"WARNING: {result.not_complete} containers did not end Complete")


if __name__ == "__main__":
    main()
