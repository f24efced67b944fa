"""``herder costs`` and ``herder quotas``: what the instances cost, and the cloud's quotas.

``herder costs`` and ``herder budget`` ask the server (``GET /api/v1/costs``, ``/budget``) when
one is reachable: it knows the spend of instances running now, which the ledger gets only every
few minutes.  When no server answers (or ``--queue-file``, ``--data-dir`` or ``--until`` is
given) they read the spend ledger the queue keeps (:attr:`ContainerQueue.ledger`), read only
through the queue backend (the SQLite file as ``herder queue check`` reads it), so they work
whether or not serve runs, and change nothing.  Both ways give the same document (the API's),
so ``--json`` has one shape.

``herder quotas`` shows the quotas the driver last read, only from the server.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from herder.app.client import Client, ClientError
from herder.app.commands import CommandError, Context, print_json, render_table
from herder.app.commands.containers import add_client_options, client_errors, open_client

if TYPE_CHECKING:
    from herder.config import Config
    from herder.spend import Ledger


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "costs",
        description="Spend of the instances by period (UTC) and by instance type, with billing "
        "increments, and the cost of the containers that finished, also by container label: "
        "asked of the server when one is reachable, else read from the spend ledger the "
        "queue keeps.",
    )
    p.add_argument(
        "--period",
        choices=("hour", "day", "month"),
        default="day",
        help="group spend by hour, day or month (default day)",
    )
    p.add_argument(
        "--last",
        type=int,
        default=7,
        metavar="N",
        help="the current period and the N-1 before it (default 7)",
    )
    p.add_argument(
        "--until",
        metavar="DATE",
        help="end the report at this UTC date or time (2026-12-07, "
        "2026-12-07T12:00) instead of now",
    )
    p.add_argument(
        "--queue-file",
        metavar="FILE",
        help="the SQLite queue file whose spend to read (default: as serve uses)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="the data directory serve uses")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_client_options(p)
    p.set_defaults(handler=run)
    q = subparsers.add_parser(
        "quotas",
        description="The quotas the driver last read (drivers with quota_headroom), with the "
        "account's usage, what herder's own instances take, what it created since the read, "
        "and what waiting containers want.",
    )
    q.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_client_options(q)
    q.set_defaults(handler=run_quotas)
    b = subparsers.add_parser(
        "budget",
        description="The spend of the current budget period (cloud.budget) against its soft "
        "and hard limits, and what waiting containers are told once one is reached: asked of "
        "the server when one is reachable, else read from the spend ledger the queue keeps "
        "(without the spend of running instances not booked yet).",
    )
    b.add_argument("--json", action="store_true", help="print JSON for scripts")
    b.add_argument("--data-dir", metavar="DIR", help="the data directory serve uses")
    b.add_argument("--queue-file", metavar="FILE", help=argparse.SUPPRESS)
    add_client_options(b)
    b.set_defaults(handler=run_budget)


def _offline(args: argparse.Namespace, ctx: Context) -> tuple[Config, Ledger, str]:
    """The configuration serve would use, the queue's spend ledger read only, and where it is."""
    from herder.app.client import default_data_dir
    from herder.app.embedded import prepare_serve
    from herder.queue.base import QueueError
    from herder.queue.sqlite import read_ledger

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    config = prepare_serve(ctx.config, data_dir, create=False).config
    if args.queue_file or config.queue.backend == "sqlite":
        path = args.queue_file or config.queue.path
        if path == ":memory:" or not Path(path).exists():
            raise CommandError(
                f"no spend recorded yet: {path} does not exist (herder serve creates it)"
            )
        try:
            return config, read_ledger(path), path
        except QueueError as exc:
            raise CommandError(str(exc)) from exc
    try:
        backend = ctx.plugins.queue_class(config.queue.backend)()
        params = backend.validate_parameters(config.queue.backend_parameters)
        ledger = backend.read_ledger(params, config.queue.path)
        return config, ledger, f"the {config.queue.backend} queue"
    except (QueueError, ValueError) as exc:
        raise CommandError(f"queue.backend {config.queue.backend!r}: {exc}") from exc


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


def _from_server(
    args: argparse.Namespace,
    ctx: Context,
    ask: Callable[[Client], dict[str, Any]],
    *,
    absent: tuple[int | None, ...] = (None,),
) -> dict[str, Any] | None:
    """What ``ask`` gets from the server, or None when none answers (status None) or it
    answers with a status in ``absent``."""
    try:
        with open_client(args, ctx) as client:
            return ask(client)
    except ClientError as exc:
        if exc.status in absent:
            return None
        raise CommandError(str(exc)) from exc


def _from_ledger(args: argparse.Namespace, ctx: Context) -> tuple[dict[str, Any], str]:
    from herder.costs import build_report, last_periods, report_document

    _, ledger, path = _offline(args, ctx)
    # The period that contains the moment just before --until is the last one shown.
    since, until = last_periods(_until(args.until) - 1e-6, args.period, args.last)
    report = build_report(
        ledger.entries(since, until),
        ledger.containers(since, until),
        period=args.period,
        since=since,
        until=until,
    )
    return report_document(report), path


def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.last < 1:
        raise CommandError("--last must be at least 1", status=2)
    document = None
    if not (args.queue_file or args.data_dir or args.until):
        document = _from_server(
            args, ctx, lambda c: c.costs(args.period, args.last), absent=(None, 404)
        )
        source = "the server"
    if document is None:
        document, source = _from_ledger(args, ctx)
    if args.json:
        print_json(ctx, document)
        return 0
    ctx.print(f"spend by {args.period} (UTC), from {source}")
    ctx.print(
        render_table(
            ("period", "spent"), [(b["period"], f"{b['spent']:.4f}") for b in document["by_period"]]
        )
    )
    ctx.print(f"total {document['total']:.4f}")
    ctx.print("")
    ctx.print(
        render_table(
            ("instance-type", "spent"),
            [(name, f"{v:.4f}") for name, v in document["by_instance_type"].items()],
        )
    )
    c = document["containers"]
    ctx.print("")
    ctx.print(
        f"finished containers: {c['finished']}, cost {c['total']:.4f}"
        + (f" ({c['per_container']:.4f} per container)" if c["finished"] else "")
    )
    if c["by_name"]:
        rows = [(name or "(no name)", f"{v:.4f}") for name, v in c["by_name"].items()]
        ctx.print(render_table(("container-name", "cost"), rows))
    if c.get("by_label"):
        rows = [(label or "(no label)", f"{v:.4f}") for label, v in c["by_label"].items()]
        ctx.print(render_table(("container-label", "cost"), rows))
    return 0


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def run_quotas(args: argparse.Namespace, ctx: Context) -> int:
    client = open_client(args, ctx)
    with client_errors(), client:
        document = client.quotas()
    if args.json:
        print_json(ctx, document)
        return 0
    if not document["enabled"]:
        ctx.print(
            "quotas are not read: the driver cannot (capability quota_headroom), or "
            "cloud.quota_refresh_interval is 0"
        )
        return 0
    rows = [
        (
            q["name"],
            q["group"],
            q["unit"],
            _num(q["limit"]),
            _num(q["usage"]),
            _num(q["herder"]),
            _num(q["pending"]),
            _num(q["wanted"]),
            _num(q["headroom"]),
            q["description"],
        )
        for q in document["items"]
    ]
    ctx.print(
        render_table(
            (
                "quota",
                "group",
                "unit",
                "limit",
                "usage",
                "herder",
                "pending",
                "wanted",
                "headroom",
                "description",
            ),
            rows,
        )
    )
    return 0


def _limit(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f}"


def _budget_from_ledger(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    from herder.costs import budget_document

    config, ledger, _ = _offline(args, ctx)
    state = config.cloud.budget.budget().state_at(datetime.now(UTC).timestamp(), ledger.total)
    return budget_document(state)


def run_budget(args: argparse.Namespace, ctx: Context) -> int:
    document = None if args.data_dir else _from_server(args, ctx, lambda c: c.budget())
    if document is None:
        document = _budget_from_ledger(args, ctx)
    if args.json:
        print_json(ctx, document)
        return 0
    state = (
        "hard limit reached"
        if document["hard_reached"]
        else ("soft limit reached" if document["soft_reached"] else "under the limits")
    )
    ctx.print(
        f"spend this {document['period']}: {document['spent']:.2f} "
        f"(soft limit {_limit(document['soft_limit'])}, hard limit "
        f"{_limit(document['hard_limit'])}; on hard limit: {document['on_hard_limit']}): {state}"
    )
    ctx.print(f"period {document['period_start']} to {document['period_end']}")
    if document["message"]:
        ctx.print(f"waiting containers say: {document['message']}")
    return 0
