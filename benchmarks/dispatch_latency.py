"""Dispatch latency on loopback: submit -> the runner has started the container.

    uv run python benchmarks/dispatch_latency.py --submissions 200

One loopback instance waits idle; each round submits one ``true`` container and measures the
time from just before ``queue.submit`` to the queue's Running transition, which the worker
records as soon as the runner's ``--detach`` returned (a request to the instance's resident
runner agent over its open SSH channel).  The next round
starts once the container completed and the worker is idle again.

The floor, measured in the same run on the same instance: one command over the worker's
already-open SSH connection plus one SQLite commit (a submission to the same queue).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loopback_harness import Bench

from herder.model import ContainerSpec, ContainerState


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def floor(bench: Bench, rounds: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Times of one SSH command on an open connection, of one SQLite commit, of one one-shot
    ``runner --list`` command over the same connection (the fallback path: the runner
    program's own start-up), and of one ``--list`` to the resident runner."""
    ex = bench.executors[0]
    runner = next((bench.dir / "runner-bin").iterdir())
    (worker,) = bench.dispatcher.pool._workers.values()  # a benchmark may peek
    ssh, sql, lst, resident = [], [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ex.execute("true")
        ssh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        c = bench.dispatcher.queue.submit(ContainerSpec(command=("true",), priority=0))
        sql.append(time.perf_counter() - t0)
        bench.dispatcher.queue.cancel(c.uuid, "floor measurement")
        t0 = time.perf_counter()
        ex.execute(f"{runner} --list")
        lst.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        worker.runner_client.call(["--list"], None, 10)
        resident.append(time.perf_counter() - t0)
    return ssh, sql, lst, resident


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--submissions", type=int, default=200)
    ap.add_argument(
        "--probe-interval",
        type=float,
        default=0.2,
        help="only paces the rounds (exit collection); not part of the latency",
    )
    args = ap.parse_args()
    bench = Bench(instances=1, vcpus=1, probe_interval=args.probe_interval)
    try:
        bench.start()
        uuid, _ = bench.submit("true")  # boot the instance, deploy the runner
        bench.wait(lambda: bench.state_time(uuid, ContainerState.COMPLETE) is not None, 180)
        bench.wait_idle(1)
        lat: list[float] = []
        to_lock: list[float] = []
        for _ in range(args.submissions):
            uuid, t0 = bench.submit("true")
            bench.wait(lambda u=uuid: bench.state_time(u, ContainerState.COMPLETE) is not None)
            started = bench.state_time(uuid, ContainerState.RUNNING)
            assert started is not None
            locked = bench.state_time(uuid, ContainerState.LOCKED)
            assert locked is not None
            lat.append(started - t0)
            to_lock.append(locked - t0)
            bench.wait_idle(1)
        ssh, sql, lst, resident = floor(bench, args.submissions)
    finally:
        bench.close()
    fl = [a + b for a, b in zip(ssh, sql, strict=True)]
    print(f"submissions: {len(lat)}")
    print(
        f"submit -> running: median {statistics.median(lat) * 1e3:.1f} ms, "
        f"p90 {pct(lat, 90) * 1e3:.1f} ms, p99 {pct(lat, 99) * 1e3:.1f} ms, "
        f"max {max(lat) * 1e3:.1f} ms"
    )
    print(
        f"floor (ssh + commit): median {statistics.median(fl) * 1e3:.1f} ms, "
        f"p99 {pct(fl, 99) * 1e3:.1f} ms "
        f"(ssh {statistics.median(ssh) * 1e3:.1f} ms, "
        f"commit {statistics.median(sql) * 1e3:.1f} ms)"
    )
    print(
        f"  of which submit -> locked: median {statistics.median(to_lock) * 1e3:.1f} ms, "
        f"locked -> running: median "
        f"{statistics.median([a - b for a, b in zip(lat, to_lock, strict=True)]) * 1e3:.1f} ms"
    )
    print(
        f"--list to the resident runner: median {statistics.median(resident) * 1e3:.1f} ms; "
        f"as a one-shot command (the fallback): {statistics.median(lst) * 1e3:.1f} ms"
    )
    print(f"ratio median latency / floor: {statistics.median(lat) / statistics.median(fl):.1f}")


if __name__ == "__main__":
    main()
