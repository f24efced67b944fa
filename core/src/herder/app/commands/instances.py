"""``herder instances`` and ``herder hold|drain|run|kill INSTANCE...``: the fleet, from a terminal.

The actions follow Arvados' admin CLI (SPEC §10.3): several ids at once, one line per id on
stderr (``<id>: 200 OK (<server>)``), nothing on stdout, and exit status 1 if any id failed.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from herder.app.client import ClientError
from herder.app.commands import CommandError, Context, command, print_json, render_table
from herder.app.commands.containers import (
    add_client_options,
    client_errors,
    colour_column,
    open_client,
    use_colour,
)
from herder.units import format_duration

WORKER_STATE_COLOURS = {
    "unknown": "35",  # magenta
    "booting": "33",  # yellow
    "idle": "36",  # cyan
    "running": "32",  # green
    "shutdown": "31",  # red
}

#: Command name -> (the API's action, what is printed when it succeeded); their help texts and
#: old names are in :data:`herder.app.commands.COMMANDS`.
ACTIONS = {
    "hold": ("hold", "held"),
    "drain": ("drain", "draining"),
    "resume": ("run", "in use"),
    "kill": ("kill", "shutting down"),
}

INSTANCE_HEADERS = (
    "instance", "address", "state", "idle-behavior", "type", "provider-type", "price",
    "in-state", "running-containers",
)  # fmt: skip


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "instances",
        description="List the instances herder runs (creates in progress have no id yet).",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_client_options(p)
    p.set_defaults(handler=run_instances)
    register_instance_types(subparsers)
    for name, (action, done) in ACTIONS.items():
        text, aliases = command(name).help, command(name).aliases
        p = subparsers.add_parser(
            name,
            description=text[0].upper()
            + text[1:]
            + "."
            + (f"  ({', '.join(aliases)}: the old name, kept for now.)" if aliases else ""),
        )
        p.add_argument("instance_ids", nargs="+", metavar="INSTANCE")
        p.add_argument("--reason", default="", help="logged by the server (and recorded for kill)")
        add_client_options(p)
        p.set_defaults(handler=run_action, action=action, done=done)


def register_instance_types(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "instance-types",
        description="List the instance types herder chooses from for each container, cheapest "
        "first: those of the running server, with the current spot price of preemptible types "
        "that have an instance now; when no server answers, those of the configuration (or, "
        "when it lists none, the ones the driver offers).",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument(
        "--offline",
        action="store_true",
        help="read the configuration only; do not ask a server",
    )
    add_client_options(p)
    p.set_defaults(handler=run_instance_types)


def run_instance_types(args: argparse.Namespace, ctx: Context) -> int:
    from herder.units import format_size

    items: list[dict[str, Any]] | None = None
    if not args.offline:
        try:
            with open_client(args, ctx) as client:
                items = client.instance_types()
        except (ClientError, CommandError) as exc:
            ctx.error(f"herder: no server answered ({exc}); showing the configuration's types")
    if items is None:
        config = ctx.config
        types = config.build_instance_types() or ctx.driver_instance_types(config)
        ordered = sorted(types.values(), key=lambda t: (t.price, t.vcpus, t.ram, t.name))
        items = [{**t.to_json(), "spot_price": None} for t in ordered]
    if args.json:
        print_json(ctx, items)
        return 0
    rows = [
        [
            t["name"],
            t["provider_type"],
            t["vcpus"],
            format_size(t["ram"]),
            format_size(t["scratch"]),
            f"{t['gpu']['device_count']} {t['gpu']['stack']}".strip()
            if t["gpu"]["device_count"]
            else "",
            f"{t['price']:.6f}",
            "" if t.get("spot_price") is None else f"{t['spot_price']:.6f}",
            "yes" if t["preemptible"] else "no",
        ]
        for t in items
    ]
    headers = [
        "name", "provider-type", "vcpus", "ram", "scratch", "gpus", "price", "spot", "preemptible",
    ]  # fmt: skip
    ctx.print(render_table(headers, rows))
    return 0


def instance_row(item: Mapping[str, Any]) -> list[Any]:
    return [
        item["instance"],
        item["address"],
        item["worker_state"],
        item["idle_behavior"],
        item["instance_type"],
        item["provider_instance_type"],
        f"{item['price']:.6f}",
        format_duration(item.get("time_in_state") or 0.0),
        ",".join(item.get("running_container_uuids") or []),
    ]


def run_instances(args: argparse.Namespace, ctx: Context) -> int:
    client = open_client(args, ctx)
    with client_errors():
        items = client.instances()
    if args.json:
        print_json(ctx, items)
        return 0
    table = render_table(INSTANCE_HEADERS, [instance_row(i) for i in items])
    ctx.print(colour_column(table, "state", WORKER_STATE_COLOURS, use_colour(ctx)))
    for line in probe_error_lines(items):
        ctx.print(line)
    return 0


def probe_error_lines(items: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per instance whose latest probe failed, below the table: too long for a column,
    and the first thing to read when instances do not come up (a bastion down, a firewall)."""
    return [
        f"{item['instance'] or item['address'] or '(creating)'}: latest probe failed: "
        f"{item['probe_error']}"
        for item in items
        if item.get("probe_error")
    ]


def run_action(args: argparse.Namespace, ctx: Context) -> int:
    """Apply one action to each id; one line per id on stderr (``<id>: held`` or ``<id>: <why
    not>``), as ``cancel`` does; 1 if any failed."""
    client = open_client(args, ctx)
    failed = 0
    for instance_id in args.instance_ids:
        try:
            client.instance_action(instance_id, args.action, args.reason)
        except ClientError as exc:
            if exc.status is None:  # the server is unreachable: no point trying the others
                raise CommandError(str(exc)) from exc
            ctx.error(f"{instance_id}: {exc}")
            failed += 1
            continue
        ctx.error(f"{instance_id}: {args.done}")
    return 1 if failed else 0
