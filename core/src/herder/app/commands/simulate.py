"""``herder simulate``: try a configuration against the simulated cloud, on a virtual clock."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from herder.app.commands import CommandError, Context, print_json
from herder.units import parse_duration

EPILOG = """\
The engine (queue, scheduler, pool, workers) is the one `herder serve` runs; the cloud is the
`sim` driver and time is virtual, so hours pass in seconds.  The instance types, timeouts and
limits come from the configuration; `cloud.driver_parameters` are used when the configured driver
is `sim`, and the fault flags below override them.

Workload: `--containers N` generates N containers whose sizes fit the configured types (cheaper
sizes more often), each running between --min-duration and --max-duration; a --fail-fraction of
them exits with code 1.  Or `--workload FILE`: a YAML/JSON list of containers with keys command,
vcpus, ram, scratch, priority, preemptible, max_run_time, at, count.

Compare: `--compare A.yaml B.yaml` runs the same workload through both configurations and prints
them side by side (cost, instance-hours, makespan, queue waits, instances), with B's change
against A: what a budget, an instance lifetime, consolidation or a billing increment does before
it is deployed.  A generated workload is sized for A's instance types.

Exit status: 0 when every container reached a final state, no container ran twice at once and no
instance was left behind (in both runs, with --compare); 1 otherwise.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate",
        description="Run the real engine against the simulated `sim` cloud on a virtual clock "
        "and summarise what happened.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        dest="simulate_config",
        metavar="FILE",
        help="configuration file (same as the global --config)",
    )
    p.add_argument(
        "--containers",
        type=int,
        default=100,
        metavar="N",
        help="number of containers to generate (default 100)",
    )
    p.add_argument("--workload", metavar="FILE", help="read the containers from FILE instead")
    p.add_argument("--seed", type=int, default=1, help="random seed of workload and faults")
    p.add_argument("--min-duration", default="30s", help="shortest container (default 30s)")
    p.add_argument("--max-duration", default="10m", help="longest container (default 10m)")
    p.add_argument(
        "--fail-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of generated containers that exit non-zero (default 0)",
    )
    p.add_argument(
        "--arrival-window",
        default="0s",
        help="spread submissions over this long (default: all at once)",
    )
    p.add_argument(
        "--faults", action="store_true", help="turn every sim fault on at moderate rates"
    )
    p.add_argument(
        "--quota",
        type=int,
        metavar="N",
        help="the simulated account can hold at most N instances (QuotaError)",
    )
    p.add_argument(
        "--capacity-error-rate",
        type=float,
        metavar="P",
        help="probability that a create fails with a CapacityError",
    )
    p.add_argument(
        "--capacity-scope",
        choices=("instance_type", "quota_group", "global"),
        help="what those capacity errors affect",
    )
    p.add_argument(
        "--rate-limit",
        metavar="DURATION",
        help="minimum time between create calls and between list calls "
        "(RateLimitError when called sooner)",
    )
    p.add_argument(
        "--max-time", default="24h", help="give up after this much simulated time (default 24h)"
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.yaml", "B.yaml"),
        help="run the same workload through two configurations and compare them",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=run)


def _duration(text: str, flag: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise CommandError(f"{flag}: {exc}", status=2) from exc


def fault_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sim driver parameters the flags ask for."""
    out: dict[str, Any] = {"seed": args.seed}
    if args.faults:
        out["faults"] = True
    if args.quota is not None:
        out["quota_max_instances"] = args.quota
    if args.capacity_error_rate is not None:
        out["capacity_error_rate"] = args.capacity_error_rate
    if args.capacity_scope is not None:
        out["capacity_error_scope"] = args.capacity_scope
    if args.rate_limit is not None:
        delay = _duration(args.rate_limit, "--rate-limit")
        out["min_time_between_create_calls"] = delay
        out["min_time_between_list_calls"] = delay
    return out


def run(args: argparse.Namespace, ctx: Context) -> int:
    from herder.config import Config, ConfigError, load_config
    from herder.tools.simulate import (
        WorkloadError,
        WorkloadOptions,
        format_summary,
        generate_workload,
        load_workload,
        run_simulation,
    )

    def load(path: str) -> Config:
        try:
            return load_config(path)
        except ConfigError as exc:
            raise CommandError(f"invalid configuration:\n{exc}") from exc

    compare: list[tuple[str, Config]] = []
    if args.compare:
        if args.simulate_config:
            raise CommandError("--compare names both configurations; drop --config", status=2)
        compare = [(path, load(path)) for path in args.compare]
        config = compare[0][1]
    elif args.simulate_config:
        config = load(args.simulate_config)
    else:
        config = ctx.config
    if args.containers < 0:
        raise CommandError("--containers must not be negative", status=2)
    if not 0 <= args.fail_fraction <= 1:
        raise CommandError("--fail-fraction must be between 0 and 1", status=2)
    try:
        if args.workload:
            workload = load_workload(args.workload)
        else:
            workload = generate_workload(
                WorkloadOptions(
                    containers=args.containers,
                    seed=args.seed,
                    min_duration=_duration(args.min_duration, "--min-duration"),
                    max_duration=_duration(args.max_duration, "--max-duration"),
                    fail_fraction=args.fail_fraction,
                    arrival_window=_duration(args.arrival_window, "--arrival-window"),
                ),
                config.build_instance_types(),
                config.containers.reserve_extra_ram,
            )
    except WorkloadError as exc:
        raise CommandError(str(exc)) from exc
    # Under injected faults the engine logs thousands of expected failures; the summary is the
    # output.  `--log-level info` (or debug) shows the engine's log as `herder serve` would.
    engine_log = logging.getLogger("herder")
    saved_level = engine_log.level
    if getattr(args, "log_level", "warning") not in ("debug", "info"):
        engine_log.setLevel(logging.CRITICAL)
    runs = compare or [("", config)]
    summaries: dict[str, dict[str, Any]] = {}
    try:
        for name, run_config in runs:
            result = run_simulation(
                run_config,
                workload,
                fault_overrides=fault_overrides(args),
                max_sim_time=_duration(args.max_time, "--max-time"),
            )
            summaries[_unique(name, summaries)] = result.summary
    except ValueError as exc:  # e.g. a fault knob out of range
        raise CommandError(f"cannot simulate: {exc}") from exc
    finally:
        engine_log.setLevel(saved_level)
    if compare:
        return _print_comparison(ctx, args, summaries)
    summary = summaries[""]
    if args.json:
        print_json(ctx, summary)
    else:
        ctx.print(format_summary(summary))
    return 0 if _ok(summary) else 1


def _ok(summary: dict[str, Any]) -> bool:
    return bool(
        summary["time"]["finished"]
        and summary["containers"]["not_final"] == 0
        and summary["containers"]["double_runs"] == 0
        and summary["instances"]["left_behind"] == 0
    )


def _unique(name: str, taken: dict[str, Any]) -> str:
    """A column name for ``name``: the file's name, made unique if both are called alike."""
    from pathlib import Path

    base = Path(name).name if name else ""
    label, n = base, 2
    while label in taken:
        label, n = f"{base} ({n})", n + 1
    return label


def _print_comparison(
    ctx: Context, args: argparse.Namespace, summaries: dict[str, dict[str, Any]]
) -> int:
    from herder.tools.simulate import compare_summaries, format_comparison

    comparison = compare_summaries(summaries)
    if args.json:
        print_json(ctx, {"comparison": comparison, "summaries": summaries})
    else:
        ctx.print(format_comparison(comparison))
    return 0 if all(_ok(s) for s in summaries.values()) else 1
