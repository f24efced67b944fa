"""``herder queue check`` and ``herder queue backup``: the queue file, looked after."""

from __future__ import annotations

import argparse
from typing import Any

from herder.app.commands import CommandError, Context, print_json


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "queue",
        description="Check or back up the SQLite queue file (queue.path, else "
        "<data-dir>/herder.db).  Both work while herder serve runs, and change nothing.",
    )
    sub = parser.add_subparsers(dest="queue_command", metavar="COMMAND", required=True)
    check = sub.add_parser(
        "check",
        help="check the queue file as herder serve does at start",
        description="Check the file's integrity, identity and schema version, and that every "
        "container record can be read.  Exits 1 with what to do if serve would refuse it.",
    )
    check.add_argument("--data-dir", metavar="DIR", help="the data directory serve uses")
    check.add_argument("--json", action="store_true", help="print JSON for scripts")
    check.set_defaults(handler=run_check)
    backup = sub.add_parser(
        "backup",
        help="copy the queue to a new file, consistently, while serve runs",
        description="Copy the queue into DEST with SQLite's online backup.  To restore, stop "
        "herder serve and put the copy in place of the queue file.",
    )
    backup.add_argument("destination", metavar="DEST")
    backup.add_argument("--data-dir", metavar="DIR", help="the data directory serve uses")
    backup.set_defaults(handler=run_backup)


def _queue_path(args: argparse.Namespace, ctx: Context) -> str:
    from pathlib import Path

    from herder.app.client import default_data_dir
    from herder.app.embedded import prepare_serve

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    config = prepare_serve(ctx.config, data_dir, create=False).config
    if config.queue.backend != "sqlite":
        raise CommandError(
            f"queue.backend {config.queue.backend!r}: only sqlite files are "
            "checked and backed up by herder"
        )
    return config.queue.path


def run_check(args: argparse.Namespace, ctx: Context) -> int:
    from herder.queue.base import QueueError
    from herder.queue.sqlite import check_file

    path = _queue_path(args, ctx)
    try:
        report = check_file(path)
    except QueueError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print_json(ctx, report)
        return 0
    counts = ", ".join(f"{n} {state}" for state, n in report["containers"].items()) or "empty"
    ctx.print(
        f"{path}: OK (queue {report['identity'] or '-'}, schema version "
        f"{report['schema_version']}; {counts})"
    )
    for uuid in report["unreadable_to_cancel"]:
        ctx.print(f"  {uuid}: its record cannot be read; serve will cancel it at start")
    return 0


def run_backup(args: argparse.Namespace, ctx: Context) -> int:
    from herder.queue.base import QueueError
    from herder.queue.sqlite import backup_file

    path = _queue_path(args, ctx)
    try:
        size = backup_file(path, args.destination)
    except (QueueError, OSError) as exc:
        raise CommandError(str(exc)) from exc
    ctx.print(f"{path} backed up to {args.destination} ({size} bytes)")
    return 0
