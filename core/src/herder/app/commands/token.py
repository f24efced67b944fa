"""``herder token``: the management token the CLI would use, for the status page or curl."""

from __future__ import annotations

import argparse
from typing import Any

from herder.app.commands import CommandError, Context


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "token",
        description="Print the management token the other commands use: $HERDER_MANAGEMENT_TOKEN, "
        "else the configuration's, else the one a local `herder serve` keeps in its data "
        "directory.  It is a secret: paste it into the status page, or pass it as "
        "`Authorization: Bearer <token>`; do not put it in a command line others can see.",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from herder.app.client import resolve_endpoint

    config = ctx.config if ctx.config_path is not None else None
    endpoint = resolve_endpoint(config=config)
    if not endpoint.token:
        raise CommandError(
            "no management token found: start `herder serve` (it generates one), or set "
            "api.management_token / $HERDER_MANAGEMENT_TOKEN"
        )
    ctx.print(endpoint.token)
    return 0
