"""Probing cost: CPU spent probing 1,000 simulated workers, and the probe rate limit.

    uv run python benchmarks/probing_cost.py                               # defaults
    uv run python benchmarks/probing_cost.py --max-probes-per-second 1000  # no effective cap

The real engine (SQLite queue in memory, scheduler, pool, workers) on the ``sim`` driver and a
:class:`~herder.runtime.VirtualRuntime`: 1,000 long ``sleep`` containers keep 1,000 instances
busy; once all run, the benchmark advances the virtual clock one second at a time for
``--seconds`` and reports the process CPU time spent per simulated second (probes, and the
scheduler passes and timers around them: an upper bound for probing alone), the ``--list``
probes per simulated second against ``cloud.max_probes_per_second``, and the traced memory
per instance of the real pool with its workers.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import time
import tracemalloc

from herder.config import Config
from herder.engine.cloud_engine import CloudEngine
from herder.model import ContainerSpec, ContainerState
from herder.runtime import VirtualRuntime
from herder.testing.sim import SimDriver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--probe-interval", type=float, default=10.0)
    ap.add_argument("--max-probes-per-second", type=float, default=10.0)
    ap.add_argument("--seconds", type=int, default=300, help="simulated seconds measured")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    config = Config.model_validate(
        {
            "cluster_id": "bench",
            "cloud": {
                "driver": "sim",
                "driver_parameters": {"boot_delay": 30.0},
                "max_instances": args.workers,
                "probe_interval": args.probe_interval,
                "max_probes_per_second": args.max_probes_per_second,
            },
            "queue": {"path": ":memory:"},
            "instance_types": {"small": {"vcpus": 1, "ram": "4GiB", "price": 0.1}},
        }
    )
    runtime = VirtualRuntime(strict=False)
    tracemalloc.start()
    disp = CloudEngine(
        config, runtime=runtime, driver=SimDriver(), uuid_random_bytes=random.Random(0).randbytes
    )
    disp.start()
    for _ in range(args.workers):
        disp.queue.submit(ContainerSpec(command=("sleep", "1000000")))
    while disp.queue.counts().get(ContainerState.RUNNING, 0) < args.workers:
        runtime.advance(1.0)
        if runtime.now() > 3600 * 24 * 365 * 100:
            raise SystemExit("workers never all ran")
    gc.collect()
    pool_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    stats = disp.instance_set.stats  # type: ignore[attr-defined]
    lists0 = stats.commands["list"]
    cpu0 = time.process_time()
    per_second: list[int] = []
    for _ in range(args.seconds):
        before = stats.commands["list"]
        runtime.advance(1.0)
        per_second.append(stats.commands["list"] - before)
    cpu = time.process_time() - cpu0
    probes = stats.commands["list"] - lists0
    disp.stop()
    print(
        f"{args.workers} workers, probe_interval {args.probe_interval:g} s, "
        f"max_probes_per_second {args.max_probes_per_second:g}, {args.seconds} s simulated"
    )
    print(
        f"CPU: {cpu / args.seconds * 1e3:.1f} ms per simulated second "
        f"({cpu / max(probes, 1) * 1e6:.0f} us per probe, everything included)"
    )
    print(
        f"probes: {probes / args.seconds:.1f}/s on average, at most {max(per_second)} in one "
        f"second (limit {args.max_probes_per_second:g}/s); each worker probed every "
        f"{args.workers * args.seconds / max(probes, 1):.1f} s"
    )
    print(
        f"memory: {pool_bytes / args.workers / 1024:.1f} KiB traced per busy instance "
        "(whole engine incl. queue, sim cloud and one container each, divided by instances)"
    )


if __name__ == "__main__":
    main()
