"""``herder plugins``: what is installed, and what each plugin registers."""

from __future__ import annotations

import argparse
from typing import Any

from herder.app.commands import Context, print_json, render_table


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plugins",
        description="List installed plugins and what each one registers.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    """The table (or JSON list) of plugins, then those left out and why.

    A plugin that failed to load does not make this command fail: the others work, and this is
    the command that shows what went wrong.  In JSON a failure is an entry with no
    registrations and an ``error``.
    """
    infos = ctx.plugins.describe()
    failures = ctx.plugins.failures()
    if args.json:
        failed = [{**f.to_json(), "name": f.plugin, "registrations": []} for f in failures]
        for entry in failed:
            del entry["plugin"]
        print_json(ctx, [info.to_json() for info in infos] + failed)
        return 0
    rows: list[list[str]] = []
    for info in infos:
        version = info.version or "-"
        if not info.registrations:
            rows.append([info.name, version, "-", "-", "-"])
        for reg in info.registrations:
            rows.append([info.name, version, reg.kind, reg.name, reg.target])
    ctx.print(render_table(["plugin", "version", "kind", "name", "target"], rows))
    if failures:
        ctx.print()
        ctx.print("Not loaded:")
        for failure in failures:
            ctx.print(f"  {failure.describe()}")
    return 0
