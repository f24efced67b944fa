"""``herder costs``: what the instances cost, by period and by type, and what containers cost.

Read from the spend ledger file that ``herder serve`` keeps (``cloud.budget.ledger_path``, else
``herder-spend.jsonl`` next to the queue), so it works whether or not serve runs, and changes
nothing.  The engine offers the same report as plain data (``Dispatcher.cost_report``).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from herder.commands import CommandError, Context, print_json, render_table


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "costs",
        help="spend by period and instance type, and cost per finished container",
        description="Spend of the instances by period (UTC) and by instance type, with billing "
        "increments, and the cost of the containers that finished: read from the spend ledger "
        "herder serve keeps in its data directory.",
    )
    p.add_argument("--period", choices=("hour", "day", "month"), default="day",
                   help="group spend by hour, day or month (default day)")
    p.add_argument("--last", type=int, default=7, metavar="N",
                   help="the current period and the N-1 before it (default 7)")
    p.add_argument("--until", metavar="DATE",
                   help="end the report at this UTC date or time (2026-12-07, "
                   "2026-12-07T12:00) instead of now")
    p.add_argument("--ledger", metavar="FILE", help="the ledger file (default: as serve uses)")
    p.add_argument("--data-dir", metavar="DIR", help="the data directory serve uses")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(handler=run)


def _ledger_path(args: argparse.Namespace, ctx: Context) -> Path:
    if args.ledger:
        return Path(args.ledger)
    from herder.client import default_data_dir
    from herder.embedded import prepare_serve
    from herder.spend import ledger_path_for

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    config = prepare_serve(ctx.config, data_dir, create=False).config
    path = ledger_path_for(config.cloud.budget.ledger_path, config.queue.path)
    if path is None:
        raise CommandError("the queue is in memory, so no spend ledger is kept; see "
                           "cloud.budget.ledger_path")
    return Path(path)


def _until(text: str | None) -> float:
    if text is None:
        return datetime.now(UTC).timestamp()
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CommandError(f"--until: {exc}", status=2) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def run(args: argparse.Namespace, ctx: Context) -> int:
    from herder.costs import build_report, last_periods
    from herder.spend import read_ledger

    if args.last < 1:
        raise CommandError("--last must be at least 1", status=2)
    path = _ledger_path(args, ctx)
    if not path.exists():
        raise CommandError(f"no spend recorded yet: {path} does not exist (herder serve "
                           "creates it)")
    ledger = read_ledger(path)
    # The period that contains the moment just before --until is the last one shown.
    since, until = last_periods(_until(args.until) - 1e-6, args.period, args.last)
    report = build_report(
        ledger.entries(since, until),
        ledger.containers(since, until),
        period=args.period,
        since=since,
        until=until,
    )
    if args.json:
        print_json(ctx, report.to_json())
        return 0
    ctx.print(f"spend by {args.period} (UTC), from {path}")
    ctx.print(render_table(
        ("period", "spent"), [(b.label, f"{b.spent:.4f}") for b in report.by_period]
    ))
    ctx.print(f"total {report.total:.4f}")
    ctx.print("")
    ctx.print(render_table(
        ("instance-type", "spent"),
        [(name, f"{v:.4f}") for name, v in report.by_instance_type.items()],
    ))
    c = report.containers
    ctx.print("")
    ctx.print(
        f"finished containers: {c.finished}, cost {c.total:.4f}"
        + (f" ({c.per_container:.4f} per container)" if c.finished else "")
    )
    if c.by_name:
        rows = [(name or "(no name)", f"{v:.4f}") for name, v in c.by_name.items()]
        ctx.print(render_table(("container-name", "cost"), rows))
    return 0
