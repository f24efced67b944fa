"""``herder plugins``: what is installed, and what each plugin registers."""

from __future__ import annotations

import argparse
from typing import Any

from herder.commands import Context, print_json, render_table


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list installed plugins and the drivers, executors and boot probes they register",
        description="List installed plugins and what each one registers.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    infos = ctx.plugins.describe()
    if args.json:
        print_json(ctx, [info.to_json() for info in infos])
        return 0
    rows: list[list[str]] = []
    for info in infos:
        version = info.version or "-"
        if not info.registrations:
            rows.append([info.name, version, "-", "-", "-"])
        for reg in info.registrations:
            rows.append([info.name, version, reg.kind, reg.name, reg.target])
    ctx.print(render_table(["plugin", "version", "kind", "name", "target"], rows))
    return 0
