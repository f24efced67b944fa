"""``herder submit``, ``containers``, ``container``, ``cancel`` and ``logs``: the queue, from a
terminal, through the management API of a running ``herder serve``.

The connection options (``--server``, ``--token``, ``--timeout``) and table colouring defined
here are shared with :mod:`herder.commands.instances`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from herder.client import Client, ClientError, resolve_endpoint
from herder.commands import CommandError, Context, print_json, render_table
from herder.model import ContainerState, is_container_uuid
from herder.units import format_duration, format_size, parse_duration, parse_size

#: Seconds between polls while ``submit --wait`` and ``logs --follow`` wait.
POLL_INTERVAL = 1.0
#: How the waiting commands pause between polls (replaced in tests that drive a virtual clock).
sleep: Callable[[float], None] = time.sleep

STATE_COLOURS = {
    "Queued": "33",  # yellow
    "Locked": "36",  # cyan
    "Running": "34",  # blue
    "Complete": "32",  # green
    "Cancelled": "31",  # red
}


# --------------------------------------------------------------------------- shared helpers


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """``--server``, ``--token`` and ``--timeout``, for every command that talks to the API."""
    parser.add_argument(
        "--server",
        metavar="URL",
        help="herder's API (default: $HERDER_SERVER, else api.listen of the config, else the "
        "address a local `herder serve` recorded)",
    )
    parser.add_argument(
        "--token",
        help="management token (default: $HERDER_MANAGEMENT_TOKEN, else the config's, else the "
        "one a local `herder serve` recorded)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="per-request timeout"
    )


def open_client(args: argparse.Namespace, ctx: Context) -> Client:
    """A client for the server and token the options, environment and config name."""
    config = ctx.config if ctx.config_path is not None else None
    endpoint = resolve_endpoint(server=args.server, token=args.token, config=config)
    return Client.from_endpoint(endpoint, args.timeout)


@contextmanager
def client_errors() -> Iterator[None]:
    """Turn a :class:`ClientError` into a :class:`CommandError` (a message, no traceback)."""
    try:
        yield
    except ClientError as exc:
        raise CommandError(str(exc)) from exc


def colour_column(
    table: str, header: str, colours: Mapping[str, str], enabled: bool
) -> str:
    """Colour the cells of one column of a :func:`render_table` table by their value.

    Colouring happens after alignment, so escape codes never upset the column widths.
    """
    if not enabled:
        return table
    lines = table.split("\n")
    start = lines[0].find(header.upper())
    if start < 0:
        return table
    out = [lines[0]]
    for line in lines[1:]:
        rest = line[start:]
        value = rest.split("  ", 1)[0].rstrip()
        code = colours.get(value)
        if code is None:
            out.append(line)
            continue
        out.append(f"{line[:start]}\x1b[{code}m{value}\x1b[0m{rest[len(value):]}")
    return "\n".join(out)


def use_colour(ctx: Context) -> bool:
    """Colours only for a person: stdout is a terminal and $NO_COLOR is not set."""
    isatty = getattr(ctx.stdout, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def _duration(seconds: float | None) -> str:
    return "" if seconds is None else format_duration(seconds)


def _check_uuid(uuid: str) -> None:
    if not is_container_uuid(uuid):
        raise CommandError(f"{uuid!r} is not a container uuid", status=2)


# --------------------------------------------------------------------------- registration


def register(subparsers: Any) -> None:
    _register_submit(subparsers)

    p = subparsers.add_parser(
        "containers",
        help="list containers",
        description="List containers (by uuid), with why each waiting one waits.",
    )
    p.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in ContainerState],
        help="only this state (repeat for several)",
    )
    p.add_argument("--limit", type=int, default=100, help="show at most N (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_client_options(p)
    p.set_defaults(handler=run_containers)

    p = subparsers.add_parser("container", help="show one container in detail")
    p.add_argument("uuid")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_client_options(p)
    p.set_defaults(handler=run_container)

    p = subparsers.add_parser(
        "cancel",
        help="cancel containers",
        description="Cancel containers; a running one is stopped.  Prints one line per uuid "
        "on stderr; the exit status is 1 if any could not be cancelled.",
    )
    p.add_argument("uuids", nargs="+", metavar="UUID")
    p.add_argument("--reason", default="", help="recorded with the cancellation")
    add_client_options(p)
    p.set_defaults(handler=run_cancel)

    p = subparsers.add_parser(
        "priority",
        help="change a container's priority",
        description="Set a container's priority: higher runs first, 0 holds a waiting one (and "
        "cancels a running one, as in Arvados).",
    )
    p.add_argument("uuid")
    p.add_argument("priority", type=int, metavar="N")
    add_client_options(p)
    p.set_defaults(handler=run_priority)

    p = subparsers.add_parser(
        "logs",
        help="print a container's log",
        description="Print a container's log.  With --follow, keep printing it until the "
        "container ends, with its progress on stderr.",
    )
    p.add_argument("uuid")
    p.add_argument("-f", "--follow", action="store_true", help="wait for more until it ends")
    add_client_options(p)
    p.set_defaults(handler=run_logs)


def _register_submit(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "submit",
        help="submit a container",
        description="Submit a container and print its uuid.  With --wait, follow it to the end "
        "(its log on stdout, progress on stderr) and exit with its exit code (1 if it was "
        "cancelled).",
        usage="herder submit [options] -- COMMAND [ARGS...]",
    )
    p.add_argument("--image", default="", help="container image (none: run as a process)")
    p.add_argument("--vcpus", type=int, default=1, help="VCPUs needed (default 1)")
    p.add_argument("--ram", default="0", metavar="SIZE", help="RAM needed, e.g. 2GiB")
    p.add_argument("--scratch", default="0", metavar="SIZE", help="scratch space, e.g. 10GiB")
    p.add_argument("--gpus", type=int, default=0, metavar="N", help="GPUs needed")
    p.add_argument("--priority", type=int, default=1, help="higher runs first (0 holds it)")
    p.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="environment variable"
    )
    p.add_argument("--name", default="", help="a name for people")
    p.add_argument(
        "--label", action="append", default=[], metavar="K=V",
        help="a free-form label (repeatable); herder costs groups spend by them",
    )
    p.add_argument("--cwd", default="", help="working directory (absolute)")
    p.add_argument(
        "--runtime", default="", choices=["", "docker", "podman", "process"],
        help="how to run it (default: an engine if the image needs one)",
    )
    p.add_argument("--max-run-time", default="0", metavar="DURATION", help="e.g. 1h (0: none)")
    p.add_argument("--preemptible", action="store_true", help="may run on preemptible instances")
    p.add_argument("--wait", action="store_true", help="follow it to the end")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    add_client_options(p)
    p.set_defaults(handler=run_submit)


# --------------------------------------------------------------------------- submit


def build_submission(args: argparse.Namespace) -> dict[str, Any]:
    """The API request body for ``herder submit``'s options; bad values name their option."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CommandError("no command given: herder submit [options] -- COMMAND [ARGS...]", 2)
    environment: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--env {item!r}: expected KEY=VALUE", 2)
        environment[key] = value
    labels: dict[str, str] = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--label {item!r}: expected KEY=VALUE", 2)
        labels[key] = value
    try:
        ram, scratch = parse_size(args.ram), parse_size(args.scratch)
    except ValueError as exc:
        raise CommandError(f"--ram/--scratch: {exc}", 2) from exc
    try:
        max_run_time = parse_duration(args.max_run_time)
    except ValueError as exc:
        raise CommandError(f"--max-run-time: {exc}", 2) from exc
    constraints: dict[str, Any] = {"vcpus": args.vcpus, "ram": ram, "scratch": scratch}
    if args.gpus:
        constraints["gpus"] = args.gpus
    return {
        "command": command,
        "image": args.image,
        "environment": environment,
        "cwd": args.cwd,
        "runtime": args.runtime,
        "runtime_constraints": constraints,
        "scheduling_parameters": {
            "preemptible": args.preemptible,
            "max_run_time": max_run_time,
        },
        "priority": args.priority,
        "name": args.name,
        "labels": labels,
    }


def run_submit(args: argparse.Namespace, ctx: Context) -> int:
    body = build_submission(args)
    client = open_client(args, ctx)
    with client_errors():
        ctr = client.submit(body)
    ctx.print(ctr["uuid"])
    if ctr["state"] == ContainerState.CANCELLED:
        ctx.error(f"herder: {ctr['uuid']}: cancelled: {_why(ctr)}")
        return 1
    if not args.wait:
        return 0
    try:
        with client_errors():
            return follow(client, ctx, ctr["uuid"])
    except KeyboardInterrupt:
        uuid = ctr["uuid"]
        ctx.error(
            f"herder: {uuid}: no longer waiting; the container keeps running "
            f"(follow it with `herder logs -f {uuid}`, stop it with `herder cancel {uuid}`)"
        )
        return 130


def _why(ctr: Mapping[str, Any]) -> str:
    status: Mapping[str, str] = ctr.get("runtime_status") or {}
    return status.get("error") or "no reason recorded"


def exit_status(ctr: Mapping[str, Any]) -> int:
    """The shell exit status for a finished container: its own, or 1 if it did not complete.

    Codes a shell cannot return (negative, above 255) become 1 rather than wrapping to 0.
    """
    code = ctr.get("exit_code")
    if ctr.get("state") != ContainerState.COMPLETE or not isinstance(code, int):
        return 1
    return code if 0 <= code <= 255 else 1


def progress_line(ctr: Mapping[str, Any]) -> str:
    """One line about where the container is, for stderr while waiting."""
    state = ctr["state"]
    if state in (ContainerState.QUEUED, ContainerState.LOCKED):
        status = ctr.get("scheduling_status") or "waiting to be scheduled"
        return f"{state}: {status}"
    if state == ContainerState.RUNNING:
        where = ctr.get("instance_id") or "an instance"
        kind = f" ({ctr['instance_type']})" if ctr.get("instance_type") else ""
        return f"Running on {where}{kind}"
    if state == ContainerState.COMPLETE:
        ran = f" after {_duration(ctr.get('run_time'))}" if ctr.get("run_time") else ""
        return f"Complete: exit code {ctr.get('exit_code')}{ran}"
    return f"Cancelled: {_why(ctr)}"


def follow(client: Client, ctx: Context, uuid: str, *, exit_with_container: bool = True) -> int:
    """Print the log as it grows and progress lines on stderr, until the container ends.

    Returns the container's exit status (:func:`exit_status`), or 0 when ``exit_with_container``
    is false.  The loop ends on the log's ``final`` flag, which the server sets only once the
    container has ended *and* the whole log has been read, so no last lines are lost.
    """
    offset, last = 0, ""
    while True:
        ctr = client.container(uuid)
        line = progress_line(ctr)
        if line != last:
            ctx.error(f"herder: {uuid}: {line}")
            last = line
        offset, final = print_log(client, ctx, uuid, offset)
        if final:
            break
        sleep(POLL_INTERVAL)
    ctr = client.container(uuid)
    line = progress_line(ctr)
    if line != last:
        ctx.error(f"herder: {uuid}: {line}")
    return exit_status(ctr) if exit_with_container else 0


def print_log(client: Client, ctx: Context, uuid: str, offset: int) -> tuple[int, bool]:
    """Print the log from ``offset`` to its current end; return the new offset and ``final``."""
    while True:
        chunk = client.log(uuid, offset)
        if chunk["data"]:
            ctx.stdout.write(chunk["data"])
            ctx.stdout.flush()
        advanced = chunk["next_offset"] > offset
        offset = chunk["next_offset"]
        if chunk["final"] or not advanced:
            return offset, bool(chunk["final"])


# --------------------------------------------------------------------------- listing


def container_row(ctr: Mapping[str, Any]) -> list[Any]:
    note = ctr.get("scheduling_status") or ctr.get("runtime_status", {}).get("error", "")
    return [
        ctr["uuid"],
        ctr["state"],
        ctr.get("exit_code"),
        ctr["priority"],
        ctr.get("instance_type"),
        ctr.get("instance_id"),
        _duration(ctr.get("run_time")),
        ctr.get("name"),
        note,
    ]


CONTAINER_HEADERS = (
    "uuid", "state", "exit", "priority", "type", "instance", "ran", "name", "status",
)  # fmt: skip


def run_containers(args: argparse.Namespace, ctx: Context) -> int:
    if args.limit < 1:
        raise CommandError("--limit must be at least 1", 2)
    client = open_client(args, ctx)
    with client_errors():
        # One more than asked for, to know whether to say that there are more.
        items = list(client.iter_containers(args.state or (), limit=args.limit + 1))
    more = len(items) > args.limit
    items = items[: args.limit]
    if args.json:
        print_json(ctx, items)
    else:
        table = render_table(CONTAINER_HEADERS, [container_row(c) for c in items])
        ctx.print(colour_column(table, "state", STATE_COLOURS, use_colour(ctx)))
    if more:
        ctx.error(f"(showing the first {args.limit}; use --limit for more)")
    return 0


def container_details(ctr: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rc = ctr["runtime_constraints"]
    sp = ctr["scheduling_parameters"]
    gpu = rc.get("gpu") or {}
    need = (
        f"{rc['vcpus']} vcpus, {format_size(rc['ram'])} RAM, "
        f"{format_size(rc['scratch'])} scratch"
    )
    if gpu.get("device_count"):
        need += f", {gpu['device_count']} {gpu.get('stack') or ''} GPUs".replace("  ", " ")
    rows: list[tuple[str, Any]] = [
        ("uuid", ctr["uuid"]),
        ("name", ctr.get("name")),
        ("state", ctr["state"]),
        ("scheduling status", ctr.get("scheduling_status")),
        ("priority", ctr["priority"]),
        ("command", " ".join(ctr["command"])),
        ("image", ctr.get("image")),
        ("runtime", ctr.get("runtime")),
        ("needs", need),
        ("preemptible", "yes" if sp.get("preemptible") else "no"),
        ("max run time", _duration(sp.get("max_run_time")) if sp.get("max_run_time") else ""),
        ("instance", ctr.get("instance_id")),
        ("instance type", ctr.get("instance_type")),
        ("attempts", ctr.get("attempts")),
        ("created", ctr.get("created_at")),
        ("locked", ctr.get("locked_at")),
        ("started", ctr.get("started_at")),
        ("finished", ctr.get("finished_at")),
        ("ran", _duration(ctr.get("run_time"))),
        ("exit code", ctr.get("exit_code")),
        ("cost", f"{ctr.get('cost', 0.0):.6f}"),
    ]
    rows += [(f"status {k}", v) for k, v in sorted((ctr.get("runtime_status") or {}).items())]
    return rows


def run_container(args: argparse.Namespace, ctx: Context) -> int:
    _check_uuid(args.uuid)
    client = open_client(args, ctx)
    with client_errors():
        ctr = client.container(args.uuid)
    if args.json:
        print_json(ctx, ctr)
        return 0
    from herder.logsetup import escape_controls

    rows = container_details(ctr)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        shown = "-" if value in (None, "") else escape_controls(str(value))
        ctx.print(f"{key + ':':<{width + 1}} {shown}")
    return 0


# --------------------------------------------------------------------------- actions


def run_priority(args: argparse.Namespace, ctx: Context) -> int:
    _check_uuid(args.uuid)
    if not 0 <= args.priority <= 2**31 - 1:
        raise CommandError(f"priority {args.priority}: expected 0 or more", status=2)
    client = open_client(args, ctx)
    with client_errors():
        ctr = client.set_priority(args.uuid, args.priority)
    ctx.error(f"{args.uuid}: priority {ctr['priority']} ({ctr['state']})")
    return 0


def run_cancel(args: argparse.Namespace, ctx: Context) -> int:
    for uuid in args.uuids:  # a usage error is reported before anything is cancelled
        _check_uuid(uuid)
    client = open_client(args, ctx)
    failed = 0
    for uuid in args.uuids:
        try:
            ctr = client.cancel(uuid, args.reason)
        except ClientError as exc:
            if exc.status is None:
                raise CommandError(str(exc)) from exc
            ctx.error(f"{uuid}: {exc}")
            failed += 1
            continue
        ctx.error(f"{uuid}: {ctr['state']}")
    return 1 if failed else 0


def run_logs(args: argparse.Namespace, ctx: Context) -> int:
    _check_uuid(args.uuid)
    client = open_client(args, ctx)
    with client_errors():
        if args.follow:
            return follow(client, ctx, args.uuid, exit_with_container=False)
        print_log(client, ctx, args.uuid, 0)
    return 0

