"""Scheduler at scale: pass time and memory with the scheduler tests' stub queue and pool.

    uv run python benchmarks/scheduler_scale.py            # 100,000 containers, 10,000 instances
    uv run python benchmarks/scheduler_scale.py --curve    # pass time from 1,000 to 100,000

Every instance is full (one running container using all its VCPUs) and the pool is at quota,
so a pass has the whole queue to order and nothing to start: the steady state of a long
backlog.  The first pass also builds the scheduler's index from nothing; later passes reuse it.
``--spare`` leaves one VCPU free on every instance instead, while every queued container needs
at least two: the pass must then look for room for each kind of container before it can stop.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core" / "tests" / "scheduler"))

from conftest import GiB, Harness, R  # type: ignore[import-not-found]

from herder.model import WorkerState

TYPES = ("t1", "t2", "t4", "t8")
VCPUS = (1, 2, 4, 8)


def build(containers: int, instances: int, spare: bool = False) -> Harness:
    """A harness with ``instances`` busy workers and ``containers`` queued containers."""
    h = Harness()
    h.pool.quota = instances
    n = 0
    for i in range(instances):
        n += 1
        type_vcpus = VCPUS[i % 4]
        used = max(1, type_vcpus - 1) if spare else type_vcpus
        uuid = h.queue.add(R, n=n, started_at=0.0, vcpus=used)
        h.pool.add_worker(f"i-{i:07d}", TYPES[i % 4], WorkerState.RUNNING, uuids=[uuid])
    for i in range(containers):
        n += 1
        vcpus = 2 + i % 3 if spare else 1 + i % 4
        h.queue.add(priority=1 + i % 1000, vcpus=vcpus, ram=GiB, n=n)
    return h


def timed_pass(h: Harness) -> float:
    t0 = time.perf_counter()
    h.sched.run_pass()
    elapsed = time.perf_counter() - t0
    h.rt.run_until_idle()
    return elapsed


def scale(
    containers: int, instances: int, repeats: int, freeze: bool, spare: bool = False
) -> dict[str, float]:
    h = build(containers, instances, spare)
    if freeze:
        gc.collect()
        gc.freeze()
    first = timed_pass(h)
    steady = [timed_pass(h) for _ in range(repeats)]
    changed = []
    for k in range(repeats):
        h.queue.add(priority=500, n=10_000_000 + k)  # one new submission since the last pass
        changed.append(timed_pass(h))
    if freeze:
        gc.unfreeze()
    return {
        "first": first,
        "median": statistics.median(steady),
        "changed": statistics.median(changed),
        "max": max(steady + changed),
    }


def memory(containers: int, instances: int) -> tuple[float, float]:
    """Bytes per queued container and per (stub) instance, after one pass."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    h = build(containers, 0)
    h.sched.run_pass()
    h.rt.run_until_idle()
    gc.collect()
    per_container = (tracemalloc.get_traced_memory()[0] - base) / containers
    del h
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    h = build(0, instances)
    h.sched.run_pass()
    h.rt.run_until_idle()
    gc.collect()
    per_instance = (tracemalloc.get_traced_memory()[0] - base) / instances
    tracemalloc.stop()
    return per_container, per_instance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--containers", type=int, default=100_000)
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--curve", action="store_true", help="pass time from 1,000 to 100,000")
    ap.add_argument("--freeze", action="store_true", help="gc.freeze() before the first pass")
    ap.add_argument("--memory", action="store_true", help="tracemalloc bytes per item")
    ap.add_argument("--spare", action="store_true", help="one VCPU left free on each instance")
    args = ap.parse_args()
    if args.memory:
        c, i = memory(args.containers, args.instances)
        print(f"memory: {c:.0f} B per queued container, {i:.0f} B per instance (stub pool)")
        return
    sizes = [1_000, 3_000, 10_000, 30_000, 100_000] if args.curve else [args.containers]
    print(
        f"{'containers':>10} {'instances':>9} {'first ms':>9} {'median ms':>9} "
        f"{'changed ms':>10} {'max ms':>7} {'us/ctr':>7}"
    )
    for n in sizes:
        inst = args.instances if not args.curve else max(1, n // 10)
        r = scale(n, inst, args.repeats, args.freeze, args.spare)
        print(
            f"{n:>10} {inst:>9} {r['first'] * 1e3:>9.1f} {r['median'] * 1e3:>9.1f} "
            f"{r['changed'] * 1e3:>10.1f} {r['max'] * 1e3:>7.1f} {r['changed'] / n * 1e6:>7.2f}"
        )


if __name__ == "__main__":
    main()
