"""Throughput on loopback: trivial containers through 8 instances, several per instance.

    uv run python benchmarks/throughput.py --containers 2000 --instances 8 --per-instance 4
    uv run python benchmarks/throughput.py --profile /tmp/herder-throughput.prof

All containers are submitted at once (``true``, one VCPU each, instances with ``--per-instance``
VCPUs); the clock runs from the first submission to the last Complete.  A warm-up round boots
instances and deploys the runner first.

A container's exit is collected by the next ``--list`` probe of its instance, so each one is
held for up to a probe interval after it exits: the benchmark uses a short probe interval
(``--probe-interval``, default 0.1 s) as a busy installation with tiny containers would.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loopback_harness import Bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--containers", type=int, default=2000)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--per-instance", type=int, default=4)
    ap.add_argument("--probe-interval", type=float, default=0.1)
    ap.add_argument("--profile", metavar="FILE", help="cProfile the timed part into FILE")
    args = ap.parse_args()
    bench = Bench(instances=args.instances, vcpus=args.per_instance,
                  probe_interval=args.probe_interval)
    try:
        bench.start()
        warm = args.instances * args.per_instance
        for _ in range(warm):
            bench.submit("true")
        bench.wait(lambda: bench.finished >= warm, 300)
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        for _ in range(args.containers):
            bench.submit("true")
        bench.wait(lambda: bench.finished >= warm + args.containers, 3600)
        elapsed = time.perf_counter() - t0
        used = len(bench.dispatcher.pool.instances())
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if prof:
            prof.disable()
            prof.dump_stats(args.profile)
            pstats.Stats(args.profile).sort_stats("cumulative").print_stats(25)
    finally:
        bench.close()
    print(f"{args.containers} containers, {used} instances x {args.per_instance}: "
          f"{elapsed:.1f} s, {args.containers / elapsed:.1f} completed/s")
    own = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    kids = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    print(f"CPU per container: herder process {own / args.containers * 1e3:.1f} ms, "
          f"commands it ran on the instances (runner agent, containers) "
          f"{kids / args.containers * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
