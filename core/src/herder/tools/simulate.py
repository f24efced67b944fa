"""``herder simulate``: the real engine against the simulated cloud, faster than real time.

The queue (SQLite in memory), scheduler, pool and workers are the ones ``herder serve`` runs; only
the cloud is the ``sim`` driver and the clock is a :class:`~herder.runtime.VirtualRuntime`, which
jumps from one due event to the next.  Operators use it to try a configuration before it costs
money; the test suite uses it to prove the engine under every fault.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from herder.config import Config
from herder.model import (
    ContainerSpec,
    ContainerState,
    InstanceType,
    RuntimeConstraints,
    SchedulingParameters,
)
from herder.runtime import VirtualRuntime
from herder.units import format_duration, parse_duration, parse_size

log = logging.getLogger(__name__)


class WorkloadError(ValueError):
    """The workload file or flags are not usable."""


@dataclass
class WorkloadOptions:
    """How to generate a workload when no file is given."""

    containers: int = 100
    seed: int = 1
    min_duration: float = 30.0
    max_duration: float = 600.0
    fail_fraction: float = 0.0  # containers meant to exit non-zero
    arrival_window: float = 0.0  # spread submissions over this many seconds (0: all at once)


@dataclass
class PlannedContainer:
    at: float  # seconds after the start
    spec: ContainerSpec
    meant_to_fail: bool


def generate_workload(
    opts: WorkloadOptions, instance_types: Mapping[str, InstanceType], reserve_ram: int = 0
) -> list[PlannedContainer]:
    """A mix of container sizes that fit the configured types, cheap sizes more often."""
    if not instance_types:
        raise WorkloadError("the configuration lists no instance types to size containers for")
    rng = random.Random(opts.seed)
    types = sorted(
        (t for t in instance_types.values() if not t.preemptible and t.gpu.device_count == 0),
        key=lambda t: t.price,
    )
    if not types:
        raise WorkloadError("the configuration has no plain (non-GPU, on-demand) instance type")
    weights = [1.0 / (i + 1) for i in range(len(types))]
    planned: list[PlannedContainer] = []
    for i in range(opts.containers):
        it = rng.choices(types, weights)[0]
        # Ask for at most the type's VCPUs and about 60% of its RAM, so that the RAM overhead
        # rules (SPEC §8.2) still let it fit, and smaller asks can share an instance.
        vcpus = rng.randint(1, it.vcpus)
        ram = max(64 * 1024**2, int(it.ram * 0.6 * 95 / 100) - reserve_ram)
        ram = rng.randint(ram // 4, ram)
        duration = rng.uniform(opts.min_duration, opts.max_duration)
        fail = rng.random() < opts.fail_fraction
        spec = ContainerSpec(
            command=("sim", f"{duration:.1f}", "1" if fail else "0"),
            image="sim/alpine",
            runtime_constraints=RuntimeConstraints(vcpus=vcpus, ram=ram),
            priority=rng.randint(1, 1000),
            name=f"sim-{i}",
        )
        at = rng.uniform(0, opts.arrival_window) if opts.arrival_window > 0 else 0.0
        planned.append(PlannedContainer(at, spec, fail))
    planned.sort(key=lambda p: p.at)
    return planned


def load_workload(path: str) -> list[PlannedContainer]:
    """Read a workload file: YAML or JSON, a list of containers.

    Each item: ``command`` (list; ``["sim", "<seconds>", "<exit code>"]`` is understood by the
    simulated runner), ``vcpus``, ``ram``, ``scratch``, ``priority``, ``preemptible``,
    ``max_run_time``, ``at`` (submission time offset, e.g. ``90s``), ``count`` (repeat).
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise WorkloadError(f"{path}: {exc}") from exc
    if isinstance(raw, dict) and "containers" in raw:
        raw = raw["containers"]
    if not isinstance(raw, list):
        raise WorkloadError(f"{path}: expected a list of containers")
    out: list[PlannedContainer] = []
    for i, item in enumerate(raw):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise WorkloadError(f"{where}: expected a mapping")
        try:
            command = tuple(str(c) for c in item.get("command", ["sim", "60", "0"]))
            exit_code = command[2] if len(command) > 2 and command[0] == "sim" else "0"
            spec = ContainerSpec(
                command=command,
                image=str(item.get("image", "sim/alpine")),
                runtime_constraints=RuntimeConstraints(
                    vcpus=int(item.get("vcpus", 1)),
                    ram=parse_size(item.get("ram", "1GiB")),
                    scratch=parse_size(item.get("scratch", 0)),
                ),
                scheduling_parameters=SchedulingParameters(
                    preemptible=bool(item.get("preemptible", False)),
                    max_run_time=parse_duration(item.get("max_run_time", 0)),
                ),
                priority=int(item.get("priority", 1)),
                name=str(item.get("name", f"item-{i}")),
            )
            at = parse_duration(item.get("at", 0))
            count = int(item.get("count", 1))
        except (TypeError, ValueError) as exc:
            raise WorkloadError(f"{where}: {exc}") from exc
        out.extend(PlannedContainer(at, spec, exit_code != "0") for _ in range(count))
    out.sort(key=lambda p: p.at)
    return out


@dataclass
class SimulationResult:
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.summary, indent=2, sort_keys=True)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[k]


def run_simulation(
    config: Config,
    workload: list[PlannedContainer],
    *,
    fault_overrides: Mapping[str, Any] | None = None,
    max_sim_time: float = 24 * 3600.0,
    step: float = 1.0,
) -> SimulationResult:
    """Run ``workload`` through the engine on the sim driver and summarise what happened."""
    from herder.engine.cloud_engine import CloudEngine
    from herder.spend import MemoryLedger
    from herder.testing.sim import SimDriver

    configured_driver = config.cloud.driver
    params = dict(config.cloud.driver_parameters) if configured_driver == "sim" else {}
    params.update(fault_overrides or {})
    # The sim driver stands in for the configured cloud, and the queue lives in memory: a
    # simulation never touches the operator's cloud account or database.
    config = config.model_copy(
        update={
            "cloud": config.cloud.model_copy(update={"driver": "sim", "driver_parameters": params}),
            "queue": config.queue.model_copy(update={"path": ":memory:"}),
        }
    )

    runtime = VirtualRuntime(strict=False)
    start = runtime.now()
    seed = int(params.get("seed", 0))
    disp = CloudEngine(
        config,
        runtime=runtime,
        driver=SimDriver(),
        uuid_random_bytes=random.Random(seed).randbytes,  # reproducible runs
        rng=random.Random(f"{seed}:pool"),
        ledger=MemoryLedger(),  # never the operator's spend ledger
    )
    wall_start = time.monotonic()
    disp.start()

    uuids: list[str] = []
    meant_to_fail: set[str] = set()
    pending = list(workload)
    pending.reverse()
    deadline = start + max_sim_time
    all_final_at: float | None = None
    # An idle instance whose billing increment is paid is kept until the increment ends.
    paid_idle = max(
        (max(it.billing.increment, it.billing.minimum) for it in disp.instance_types.values()),
        default=0.0,
    )
    drain_grace = (
        paid_idle
        + config.cloud.timeout_idle
        + 2 * config.cloud.sync_interval
        + config.cloud.timeout_shutdown
        + 2 * config.cloud.probe_interval
    )
    stats = disp.instance_set.stats  # type: ignore[attr-defined]
    while runtime.now() < deadline:
        now = runtime.now()
        while pending and start + pending[-1].at <= now:
            item = pending.pop()
            ctr = disp.queue.submit(item.spec)
            uuids.append(ctr.uuid)
            if item.meant_to_fail:
                meant_to_fail.add(ctr.uuid)
        if not pending:
            if all_final_at is None and all(
                (c := disp.queue.get(u)) is not None and c.state.final for u in uuids
            ):
                all_final_at = now
            if all_final_at is not None and (stats.alive == 0 or now > all_final_at + drain_grace):
                break
        runtime.advance(step)
    sim_end = runtime.now()
    wall = time.monotonic() - wall_start

    containers = [c for u in uuids if (c := disp.queue.get(u)) is not None]
    by_state: Counter[str] = Counter()
    cancel_reasons: Counter[str] = Counter()
    waits: list[float] = []
    unexpected_failures = 0
    for ctr in containers:
        key = ctr.state.value
        if ctr.state is ContainerState.COMPLETE:
            key = "Complete (exit 0)" if ctr.exit_code == 0 else "Complete (exit non-zero)"
            if ctr.exit_code != 0 and ctr.uuid not in meant_to_fail:
                unexpected_failures += 1
        elif ctr.state is ContainerState.CANCELLED:
            cancel_reasons[ctr.status("error") or "(no reason)"] += 1
        by_state[key] += 1
        if ctr.started_at is not None:
            waits.append(ctr.started_at - ctr.created_at)

    summary: dict[str, Any] = {
        "containers": {
            "submitted": len(uuids),
            "by_final_state": dict(sorted(by_state.items())),
            "not_final": sum(1 for c in containers if not c.state.final),
            "meant_to_fail": len(meant_to_fail),
            "unexpected_failures": unexpected_failures,
            "cancel_reasons": dict(cancel_reasons.most_common()),
            "double_runs": stats.double_runs,
        },
        "cloud": {"simulated": "sim", "configured_driver": configured_driver},
        "instances": {
            "created": stats.created,
            "destroyed": stats.destroyed,
            # Gone without being destroyed: the sim's "disappear" fault (preempted, say).
            "disappeared": stats.created - stats.destroyed - stats.alive,
            "left_behind": stats.alive,
            "peak": stats.peak_alive,
        },
        "cloud_calls": stats.calls_summary(),
        "faults_injected": dict(sorted(stats.faults.items())),
        "cost": {
            "instance_hours": round(stats.instance_seconds(sim_end) / 3600.0, 3),
            "total": round(stats.cost(sim_end), 4),
        },
        "queue_wait_seconds": {
            "mean": round(statistics.fmean(waits), 1) if waits else 0.0,
            "p95": round(_percentile(waits, 0.95), 1),
        },
        "time": {
            # From the first submission until the last container reached a final state.
            "makespan_seconds": round(
                (all_final_at if all_final_at is not None else sim_end)
                - start
                - (workload[0].at if workload else 0.0),
                1,
            ),
            "simulated_seconds": round(sim_end - start, 1),
            "simulated": format_duration(sim_end - start),
            "wall_seconds": round(wall, 2),
            "finished": all_final_at is not None,
        },
    }
    disp.stop()
    runtime.shutdown()
    return SimulationResult(summary)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as people read it."""
    c, inst, cost = summary["containers"], summary["instances"], summary["cost"]
    lines = [
        f"simulated {summary['time']['simulated']} in {summary['time']['wall_seconds']}s"
        + ("" if summary["time"]["finished"] else "  (NOT FINISHED: raise --max-time)"),
        "",
    ]
    configured = summary.get("cloud", {}).get("configured_driver", "sim")
    if configured != "sim":
        lines += [
            f"cloud: the simulated cloud stood in for driver {configured!r}; every other "
            "setting of the configuration applied",
            "",
        ]
    lines.append(f"containers: {c['submitted']} submitted")
    for state, n in c["by_final_state"].items():
        lines.append(f"  {state:<26} {n}")
    if c["not_final"]:
        lines.append(f"  {'not final':<26} {c['not_final']}")
    for reason, n in c["cancel_reasons"].items():
        lines.append(f"    cancelled: {reason}  ×{n}")
    lines.append(f"  double runs                {c['double_runs']}")
    lines += [
        "",
        f"instances: {inst['created']} created, {inst['destroyed']} destroyed, "
        + (
            f"{inst['disappeared']} disappeared without being destroyed, "
            if inst.get("disappeared")
            else ""
        )
        + f"{inst['left_behind']} left behind, peak {inst['peak']}",
        f"cost: {cost['instance_hours']} instance-hours, {cost['total']:.4f} total",
        f"queue wait: mean {summary['queue_wait_seconds']['mean']}s, "
        f"p95 {summary['queue_wait_seconds']['p95']}s",
        "",
        "cloud calls:",
    ]
    for kind, outcomes in summary["cloud_calls"].items():
        if not outcomes:
            continue  # never called
        detail = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        lines.append(f"  {kind:<10} {detail}")
    if summary["faults_injected"]:
        lines.append("faults injected:")
        for kind, n in summary["faults_injected"].items():
            lines.append(f"  {kind:<22} {n}")
    return "\n".join(lines)


#: The rows of ``herder simulate --compare``: (label, how to read it from a summary, format).
COMPARE_ROWS: tuple[tuple[str, tuple[str, str], str], ...] = (
    ("cost", ("cost", "total"), "{:.4f}"),
    ("instance-hours", ("cost", "instance_hours"), "{:.3f}"),
    ("makespan (s)", ("time", "makespan_seconds"), "{:.0f}"),
    ("queue wait mean (s)", ("queue_wait_seconds", "mean"), "{:.1f}"),
    ("queue wait p95 (s)", ("queue_wait_seconds", "p95"), "{:.1f}"),
    ("instances created", ("instances", "created"), "{}"),
    ("instances at peak", ("instances", "peak"), "{}"),
    ("containers not final", ("containers", "not_final"), "{}"),
)


def compare_summaries(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The figures ``--compare`` shows, per configuration, plus B's change against A."""
    out: dict[str, Any] = {"configurations": list(summaries), "rows": []}
    names = list(summaries)
    for label, (section, key), _fmt in COMPARE_ROWS:
        values = [summaries[n][section][key] for n in names]
        row: dict[str, Any] = {"figure": label, "values": dict(zip(names, values, strict=True))}
        if len(values) == 2 and isinstance(values[0], int | float) and values[0]:
            row["change_percent"] = round(100.0 * (values[1] - values[0]) / values[0], 1)
        out["rows"].append(row)
    return out


def format_comparison(comparison: Mapping[str, Any]) -> str:
    """The comparison as a table: one column per configuration, then B against A."""
    names: list[str] = comparison["configurations"]
    formats = {label: fmt for label, _path, fmt in COMPARE_ROWS}
    width = max(12, *(len(n) for n in names))
    header = f"{'':<22}" + "".join(f"{n:>{width + 2}}" for n in names) + f"{'change':>10}"
    lines = [header]
    for row in comparison["rows"]:
        fmt = formats[row["figure"]]
        cells = "".join(f"{fmt.format(row['values'][n]):>{width + 2}}" for n in names)
        change = row.get("change_percent")
        lines.append(
            f"{row['figure']:<22}{cells}"
            + (f"{change:>+9.1f}%" if change is not None else f"{'':>10}")
        )
    return "\n".join(lines)
