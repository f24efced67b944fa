"""``herder submit``, ``containers``, ``container``, ``cancel`` and ``logs``: the queue, from a
terminal, through the management API of a running ``herder serve``.

The connection options (``--server``, ``--token``, ``--timeout``) and table colouring defined
here are shared with :mod:`herder.app.commands.instances`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from herder.app.client import Client, ClientError, resolve_endpoint
from herder.app.commands import CommandError, Context, print_json, render_table
from herder.names import ContainerState, is_array_id, is_container_uuid
from herder.units import format_duration, format_size, parse_duration, parse_size

#: Seconds between polls while ``submit --wait`` and ``logs --follow`` wait.
POLL_INTERVAL = 0.5
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


def colour_column(table: str, header: str, colours: Mapping[str, str], enabled: bool) -> str:
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
        out.append(f"{line[:start]}\x1b[{code}m{value}\x1b[0m{rest[len(value) :]}")
    return "\n".join(out)


def use_colour(ctx: Context) -> bool:
    """Colours only for a person: stdout is a terminal and $NO_COLOR is not set."""
    isatty = getattr(ctx.stdout, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def _duration(seconds: float | None) -> str:
    return "" if seconds is None else format_duration(seconds)


def _check_array(array_id: str) -> None:
    if not is_array_id(array_id):
        raise CommandError(f"{array_id!r} is not an array id (zzzzz-a88ay-...)", status=2)


def _check_uuid(uuid: str) -> None:
    if not is_container_uuid(uuid):
        raise CommandError(f"{uuid!r} is not a container uuid", status=2)


# --------------------------------------------------------------------------- registration


def register(subparsers: Any) -> None:
    _register_submit(subparsers)

    p = subparsers.add_parser(
        "containers",
        description="List containers, newest first (or, with --queue, the waiting ones in the "
        "order they are served), with why each waiting one waits.",
    )
    p.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in ContainerState],
        help="only this state (repeat for several)",
    )
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="only those created since WHEN: a duration ago (30m, 2h) or an RFC 3339 time",
    )
    p.add_argument("--array", metavar="ID", default="", help="only the members of this array")
    p.add_argument(
        "--queue",
        action="store_true",
        help="the waiting containers (Queued and Locked, priority above 0) in the order they "
        "are served instead: what runs next first",
    )
    p.add_argument("--limit", type=int, default=100, help="show at most N (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_client_options(p)
    p.set_defaults(handler=run_containers)

    p = subparsers.add_parser("container")
    p.add_argument("uuid")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_client_options(p)
    p.set_defaults(handler=run_container)

    p = subparsers.add_parser(
        "cancel",
        description="Cancel containers (or every unfinished member of an array) in one "
        "request; a running one is stopped.  Prints one line per uuid on stderr; the exit "
        "status is 1 if any could not be cancelled (not found, or completed already).",
    )
    p.add_argument("uuids", nargs="*", metavar="UUID")
    p.add_argument("--array", metavar="ID", default="", help="cancel the members of this array")
    p.add_argument("--reason", default="", help="recorded with the cancellation")
    add_client_options(p)
    p.set_defaults(handler=run_cancel)

    p = subparsers.add_parser(
        "priority",
        description="Set a container's priority: higher runs first, 0 holds a waiting one (and "
        "cancels a running one, as in Arvados).",
    )
    p.add_argument("uuid")
    p.add_argument("priority", type=int, metavar="N")
    add_client_options(p)
    p.set_defaults(handler=run_priority)

    p = subparsers.add_parser(
        "logs",
        description="Print a container's log.  With --follow, keep printing it until the "
        "container ends, with its progress on stderr.",
    )
    p.add_argument("uuid")
    p.add_argument("-f", "--follow", action="store_true", help="wait for more until it ends")
    p.add_argument(
        "--stream",
        choices=["stdout", "stderr", "runner"],
        default="",
        help="only this stream's lines, without their marker (default: every line, marked)",
    )
    add_client_options(p)
    p.set_defaults(handler=run_logs)


def _register_submit(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "submit",
        description="Submit a container and print its uuid.  With --wait, follow it to the end "
        "(its log on stdout, progress on stderr) and exit with its exit code (1 if it was "
        "cancelled).",
        usage="herder submit [options] -- COMMAND [ARGS...]",
    )
    p.add_argument("--image", default="", help="container image (none: run as a process)")
    p.add_argument(
        "--pull",
        default="",
        choices=["if-not-present", "always", "never"],
        help="when to pull the image (default: the server's containers.pull_policy)",
    )
    p.add_argument(
        "--vcpus",
        type=int,
        default=1,
        help="VCPUs needed (default 1); 0 asks for a share of one VCPU that every 0-VCPU "
        "container on the instance shares, for light work",
    )
    p.add_argument("--ram", default="0", metavar="SIZE", help="RAM needed, e.g. 2GiB")
    p.add_argument("--scratch", default="0", metavar="SIZE", help="scratch space, e.g. 10GiB")
    p.add_argument("--gpus", type=int, default=0, metavar="N", help="GPUs needed")
    p.add_argument("--priority", type=int, default=1, help="higher runs first (0 holds it)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable")
    p.add_argument("--name", default="", help="a name for people")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="K=V",
        help="a free-form label (repeatable); herder costs groups spend by them",
    )
    p.add_argument("--cwd", default="", help="working directory (absolute)")
    p.add_argument(
        "--runtime",
        default="",
        choices=["", "docker", "podman", "process"],
        help="how to run it (default: an engine if the image needs one)",
    )
    p.add_argument("--max-run-time", default="0", metavar="DURATION", help="e.g. 1h (0: none)")
    p.add_argument("--preemptible", action="store_true", help="may run on preemptible instances")
    p.add_argument("--wait", action="store_true", help="follow it to the end")
    p.add_argument(
        "--after",
        action="append",
        default=[],
        metavar="UUID",
        help="hold it until container UUID has completed with exit code 0; it is cancelled "
        "if UUID fails or is cancelled (repeat for several)",
    )
    p.add_argument(
        "--count",
        type=int,
        metavar="N",
        help="submit an array: N containers of this spec, each with its index (0 to N-1) in "
        "$HERDER_ARRAY_INDEX and the array id in $HERDER_ARRAY_ID; list, wait on or cancel "
        "them together with --array ID",
    )
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="submit every container FILE describes, all or none: YAML (a list of mappings) "
        "or JSON lines (one object a line), each with the fields of the options above "
        "(command, image, vcpus, ram, scratch, gpus, priority, env, name, cwd, runtime, "
        "max_run_time, preemptible, after); the options given here are the defaults; - reads "
        "stdin.  An item's after may give the name of another item of the file (a name only "
        "that item has) as well as container uuids",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    add_client_options(p)
    p.set_defaults(handler=run_submit)


# --------------------------------------------------------------------------- submit


def build_submission(args: argparse.Namespace, *, in_batch: bool = False) -> dict[str, Any]:
    """The API request body for ``herder submit``'s options; bad values name their option.
    ``in_batch``: an item of a ``--from`` file, whose ``after`` may name other items."""
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
    if not isinstance(args.vcpus, int) or isinstance(args.vcpus, bool) or args.vcpus < 0:
        raise CommandError(f"--vcpus {args.vcpus!r}: expected a whole number, 0 or more", 2)
    if not isinstance(args.gpus, int) or isinstance(args.gpus, bool) or args.gpus < 0:
        raise CommandError(f"--gpus {args.gpus!r}: expected a whole number, 0 or more", 2)
    for uuid in args.after:
        if in_batch and isinstance(uuid, str) and uuid:
            continue  # a uuid or another item's name: the server resolves it
        if not isinstance(uuid, str) or not is_container_uuid(uuid):
            raise CommandError(f"--after {uuid!r}: not a container uuid", 2)
    constraints: dict[str, Any] = {"vcpus": args.vcpus, "ram": ram, "scratch": scratch}
    if args.gpus:
        constraints["gpus"] = args.gpus
    return {
        "command": command,
        "image": args.image,
        "environment": environment,
        "cwd": args.cwd,
        "runtime": args.runtime,
        "pull_policy": args.pull,
        "runtime_constraints": constraints,
        "scheduling_parameters": {
            "preemptible": args.preemptible,
            "max_run_time": max_run_time,
        },
        "priority": args.priority,
        "name": args.name,
        **({"after": list(args.after)} if args.after else {}),
        "labels": labels,
    }


#: The keys an item of ``submit --from`` may have, and the option each stands for.
FILE_FIELDS = {
    "command": "command", "image": "image", "vcpus": "vcpus", "ram": "ram",
    "scratch": "scratch", "gpus": "gpus", "priority": "priority", "env": "env",
    "environment": "env", "name": "name", "cwd": "cwd", "runtime": "runtime",
    "max_run_time": "max_run_time", "preemptible": "preemptible", "after": "after",
}  # fmt: skip


def read_submissions(text: str, name: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The items of a ``submit --from`` file, each with where it is (for messages): JSON
    lines when every non-blank line is a JSON object, else a YAML list of mappings."""
    import json

    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if lines and all(line.lstrip().startswith("{") for _, line in lines):
        items: list[tuple[str, Mapping[str, Any]]] = []
        for n, line in lines:
            try:
                doc = json.loads(line)
            except ValueError as exc:
                raise CommandError(f"{name}:{n}: not valid JSON: {exc}", 2) from None
            if not isinstance(doc, dict):
                raise CommandError(f"{name}:{n}: expected a JSON object", 2)
            items.append((f"{name}:{n}", doc))
        return items
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        why = " ".join(str(exc).split())[:200]
        raise CommandError(f"{name}: not valid YAML or JSON lines: {why}", 2) from None
    if not isinstance(doc, list) or not all(isinstance(item, dict) for item in doc):
        raise CommandError(
            f"{name}: expected a YAML list of containers (mappings) or JSON lines", 2
        )
    return [(f"{name} item {i + 1}", item) for i, item in enumerate(doc)]


def submission_from_item(
    defaults: argparse.Namespace, where: str, item: Mapping[str, Any]
) -> dict[str, Any]:
    """One item of a ``submit --from`` file as an API request body: its keys replace the
    options' values, and go through the same checks as the options."""
    values = dict(vars(defaults))
    values["command"] = []
    for key, value in item.items():
        dest = FILE_FIELDS.get(str(key))
        if dest is None:
            known = ", ".join(sorted(k for k in FILE_FIELDS if k != "environment"))
            raise CommandError(f"{where}: unknown field {key!r} (known: {known})", 2)
        if dest == "command" and isinstance(value, str):
            import shlex

            value = shlex.split(value)  # words, as a shell would split them; never run by one
        if dest == "after" and isinstance(value, str):
            value = [value]
        if dest == "env" and isinstance(value, dict):
            value = [f"{k}={v}" for k, v in value.items()]
        if dest in ("ram", "scratch", "max_run_time") and isinstance(value, int | float):
            value = str(value)
        values[dest] = value
    if not isinstance(values["command"], list) or not all(
        isinstance(arg, str) for arg in values["command"]
    ):
        raise CommandError(f"{where}: command must be a list of strings or one string", 2)
    if not isinstance(values["after"], list):
        raise CommandError(f"{where}: after must be a uuid or name, or a list of them", 2)
    if not isinstance(values["env"], list):
        raise CommandError(f"{where}: env must be a mapping or a list of K=V", 2)
    try:
        return build_submission(argparse.Namespace(**values), in_batch=True)
    except CommandError as exc:
        raise CommandError(f"{where}: {exc}", exc.status) from None


def run_submit_from(args: argparse.Namespace, ctx: Context) -> int:
    """``submit --from FILE``: every container in one request, all or none."""
    command = [arg for arg in args.command if arg != "--"]
    if command:
        raise CommandError("give either --from FILE or a command, not both", 2)
    name = args.from_file
    try:
        if name == "-":
            text = ctx.stdin.read()
        else:
            with open(name, encoding="utf-8") as fh:
                text = fh.read()
    except OSError as exc:
        raise CommandError(f"{name}: {exc.strerror or exc}", 2) from None
    except UnicodeDecodeError:
        raise CommandError(f"{name}: not UTF-8 text", 2) from None
    items = read_submissions(text, "stdin" if name == "-" else name)
    if not items:
        raise CommandError(f"{name}: no containers in it", 2)
    bodies = [submission_from_item(args, where, item) for where, item in items]
    client = open_client(args, ctx)
    try:
        made = client.submit_batch(bodies)
    except ClientError as exc:
        raise CommandError(_name_item(str(exc), exc.field, items)) from exc
    return report_submitted(client, ctx, made, args.wait)


def _name_item(message: str, field: str | None, items: list[tuple[str, Any]]) -> str:
    """The server's error with the batch index it names replaced by the item's place in the
    file (``items[3].ram`` → ``jobs.yaml item 4: ... (ram)``)."""
    import re

    found = re.match(r"items\[(\d+)\]\.?(.*)", field or "")
    if found is None or int(found.group(1)) >= len(items):
        return message
    where = items[int(found.group(1))][0]
    message = re.sub(r"^item \d+: ", "", message).replace(f" ({field})", "")
    rest = f" ({found.group(2)})" if found.group(2) else ""
    return f"{where}: {message}{rest}"


def report_submitted(
    client: Client, ctx: Context, made: list[dict[str, Any]], wait: bool, array_id: str = ""
) -> int:
    """Print the uuids of a batch or an array; with ``wait``, wait until every one has ended.
    Exits 1 if any was cancelled or failed."""
    reasons: dict[str, list[str]] = {}
    for ctr in made:
        ctx.print(ctr["uuid"])
        if ctr["state"] == ContainerState.CANCELLED:
            reasons.setdefault(_why(ctr), []).append(ctr["uuid"])
    # One line per reason, not per container: an array that fits no instance type is one
    # problem, however many members it has.
    for why, uuids in reasons.items():
        who = uuids[0] if len(uuids) == 1 else f"{len(uuids)} containers"
        ctx.error(f"herder: {who}: cancelled: {why}")
    cancelled = sum(len(uuids) for uuids in reasons.values())
    if array_id:
        ctx.error(f"herder: array {array_id}: {len(made)} containers")
    if not wait:
        return 1 if cancelled else 0
    fetch = _array_members(client, array_id) if array_id else _batch_members(client, made)
    try:
        with client_errors():
            return wait_all(ctx, fetch, len(made))
    except KeyboardInterrupt:
        which = f" --array {array_id}" if array_id else ""
        ctx.error(
            f"herder: no longer waiting; the {len(made)} containers keep running (list them "
            f"with `herder containers{which}`, stop them with `herder cancel"
            f"{which or ' UUID...'}`)"
        )
        return 130


Fetch = Callable[[], list[dict[str, Any]]]


def _array_members(client: Client, array_id: str) -> Fetch:
    """Every member of the array, a few pages per poll whatever its size."""
    return lambda: list(client.iter_containers(array=array_id))


#: Above this many containers, a batch is followed through the listing, not one by one.
FOLLOW_ONE_BY_ONE = 20


def _batch_members(client: Client, made: list[dict[str, Any]]) -> Fetch:
    """Every container of a batch: one request per container that has not ended yet for a
    small batch; for a large one, the listing of what was created since the batch (a few
    pages, however large the batch), so that waiting never costs the server a request per
    container per poll."""
    latest = {c["uuid"]: c for c in made}
    if len(made) > FOLLOW_ONE_BY_ONE:
        from datetime import datetime, timedelta

        # A second early: the timestamps are rounded to milliseconds.
        start = min(datetime.fromisoformat(c["created_at"].replace("Z", "+00:00")) for c in made)
        since = (start - timedelta(seconds=1)).isoformat().replace("+00:00", "Z")

        def listed() -> list[dict[str, Any]]:
            for ctr in client.iter_containers(since=since):
                if ctr["uuid"] in latest:
                    latest[ctr["uuid"]] = ctr
            return list(latest.values())

        return listed

    def fetch() -> list[dict[str, Any]]:
        for uuid, ctr in latest.items():
            if not _ended(ctr):
                latest[uuid] = client.container(uuid)
        return list(latest.values())

    return fetch


def _ended(ctr: Mapping[str, Any]) -> bool:
    return ctr["state"] in (ContainerState.COMPLETE, ContainerState.CANCELLED)


def wait_all(ctx: Context, fetch: Fetch, total: int) -> int:
    """Poll until every container ``fetch`` returns has ended, with a progress line on stderr
    whenever the counts change and one line per failure; 0 when every one completed with exit
    code 0, else 1."""
    told: set[str] = set()
    last = ""
    while True:
        records = fetch()
        ended = [c for c in records if _ended(c)]
        failed = [c for c in ended if exit_status(c) != 0]
        for ctr in failed:
            if ctr["uuid"] not in told:
                told.add(ctr["uuid"])
                ctx.error(f"herder: {ctr['uuid']}: {progress_line(ctr)}")
        line = f"herder: {len(ended)} of {total} ended, {len(failed)} failed or cancelled"
        if line != last:
            ctx.error(line)
            last = line
        if len(ended) >= total:
            return 1 if failed else 0
        sleep(POLL_INTERVAL)


def run_submit(args: argparse.Namespace, ctx: Context) -> int:
    if args.from_file is not None:
        if args.count is not None:
            raise CommandError("give either --from FILE or --count N, not both", 2)
        return run_submit_from(args, ctx)
    body = build_submission(args)
    if args.count is not None:
        if args.count < 1:
            raise CommandError(f"--count {args.count}: expected 1 or more", 2)
        client = open_client(args, ctx)
        with client_errors():
            array = client.submit_array(body, args.count)
        return report_submitted(client, ctx, array["items"], args.wait, array["array_id"])
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


class StreamFilter:
    """One stream's lines of a marked log (``stdout <text>``...), without the marker.

    Chunks of the log may end inside a line: the partial line is kept for the next one.
    """

    def __init__(self, stream: str) -> None:
        self.prefix = stream + " "
        self.partial = ""

    def feed(self, text: str) -> str:
        *lines, self.partial = (self.partial + text).split("\n")
        return "".join(self._keep(line) for line in lines)

    def end(self) -> str:
        rest, self.partial = self.partial, ""
        return self._keep(rest) if rest else ""

    def _keep(self, line: str) -> str:
        return line[len(self.prefix) :] + "\n" if line.startswith(self.prefix) else ""


def follow(
    client: Client,
    ctx: Context,
    uuid: str,
    *,
    exit_with_container: bool = True,
    only: StreamFilter | None = None,
) -> int:
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
        offset, final = print_log(client, ctx, uuid, offset, only)
        if final:
            break
        sleep(POLL_INTERVAL)
    ctr = client.container(uuid)
    line = progress_line(ctr)
    if line != last:
        ctx.error(f"herder: {uuid}: {line}")
    return exit_status(ctr) if exit_with_container else 0


def print_log(
    client: Client, ctx: Context, uuid: str, offset: int, only: StreamFilter | None = None
) -> tuple[int, bool]:
    """Print the log from ``offset`` to its current end (``only`` one stream's lines, when
    given); return the new offset and ``final``."""
    while True:
        chunk = client.log(uuid, offset)
        text = chunk["data"]
        if only is not None:
            text = only.feed(text) + (only.end() if chunk["final"] else "")
        if text:
            ctx.stdout.write(text)
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
    since = since_time(args.since) if args.since else ""
    if args.array:
        _check_array(args.array)
    client = open_client(args, ctx)
    order = "queue" if args.queue else ""
    with client_errors():
        # One more than asked for, to know whether to say that there are more.
        items = list(
            client.iter_containers(
                args.state or (), args.limit + 1, since=since, array=args.array, order=order
            )
        )
    more = len(items) > args.limit
    items = items[: args.limit]
    if args.json:
        print_json(ctx, items)
    else:
        table = render_table(CONTAINER_HEADERS, [container_row(c) for c in items])
        ctx.print(colour_column(table, "state", STATE_COLOURS, use_colour(ctx)))
    if more:
        which = f"first {args.limit} in line" if args.queue else f"newest {args.limit}"
        ctx.error(f"(showing the {which}; use --limit for more)")
    return 0


def since_time(text: str, now: float | None = None) -> str:
    """``--since``'s value as the RFC 3339 time the API takes: a duration (``2h``) means that
    long before ``now``; anything else must be an RFC 3339 time already."""
    from datetime import UTC, datetime

    try:
        ago = parse_duration(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise CommandError(
                f"--since {text!r}: expected a duration (30m, 2h) or a time like "
                "2026-12-06T10:00:00Z",
                2,
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
    start = (time.time() if now is None else now) - ago
    return datetime.fromtimestamp(start, UTC).isoformat().replace("+00:00", "Z")


def container_details(ctr: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rc = ctr["runtime_constraints"]
    sp = ctr["scheduling_parameters"]
    gpu = rc.get("gpu") or {}
    need = (
        f"{rc['vcpus']} vcpus, {format_size(rc['ram'])} RAM, {format_size(rc['scratch'])} scratch"
    )
    if gpu.get("device_count"):
        need += f", {gpu['device_count']} {gpu.get('stack') or ''} GPUs".replace("  ", " ")
    rows: list[tuple[str, Any]] = [
        ("uuid", ctr["uuid"]),
        ("name", ctr.get("name")),
        ("state", ctr["state"]),
        ("scheduling status", ctr.get("scheduling_status")),
        ("priority", ctr["priority"]),
        ("array", ctr.get("array_id")),
        ("after", " ".join(ctr.get("after") or [])),
        ("command", " ".join(ctr["command"])),
        ("image", ctr.get("image")),
        ("pull policy", ctr.get("pull_policy")),
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
    from herder.text import escape_controls

    rows = container_details(ctr)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        shown = "-" if value in (None, "") else escape_controls(str(value))
        ctx.print(f"{key + ':':<{width + 1}} {shown}")
    history = ctr.get("attempt_history") or []
    if history:
        ctx.print("")
        ctx.print(attempts_table(history))
        ran = [a for a in history if a.get("started_at")]
        if len(ran) > 1:
            ctx.print(f"It ran {len(ran)} times:")
            for a in ran[:-1]:
                ctx.print(
                    f"  attempt {a['number']} on {a.get('instance_id') or '-'}: "
                    f"{escape_controls(attempt_outcome(a))}"
                )
    return 0


def attempt_outcome(attempt: Mapping[str, Any]) -> str:
    """One attempt's end in words: the exit code, or the outcome and why."""
    outcome = str(attempt.get("outcome", ""))
    if outcome == "complete":
        return f"exit code {attempt.get('exit_code')}"
    reason = attempt.get("reason") or ""
    return f"{outcome}: {reason}" if reason else outcome


def attempts_table(history: Sequence[Mapping[str, Any]]) -> str:
    """Every dispatch attempt: where, when, how it ended and what it cost."""
    rows = [
        [
            a.get("number"),
            a.get("instance_id"),
            a.get("instance_type"),
            a.get("started_at"),
            a.get("ended_at"),
            attempt_outcome(a),
            f"{a.get('cost', 0.0):.6f}",
        ]
        for a in history
    ]
    return render_table(
        ["attempt", "instance", "type", "started", "ended", "outcome", "cost"], rows
    )


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
    """One request for the uuids given and one for ``--array``, each cancelling many
    containers and answering what happened to each."""
    if not args.uuids and not args.array:
        raise CommandError("nothing to cancel: give UUIDs or --array ID", 2)
    for uuid in args.uuids:  # a usage error is reported before anything is cancelled
        _check_uuid(uuid)
    if args.array:
        _check_array(args.array)
    client = open_client(args, ctx)
    failed = 0
    with client_errors():
        if args.uuids:
            failed += _report_cancel(ctx, client.cancel_many(args.uuids, reason=args.reason))
        if args.array:
            reply = client.cancel_many(array=args.array, reason=args.reason)
            if not reply["items"]:
                ctx.error(f"{args.array}: no unfinished containers in this array")
            failed += _report_cancel(ctx, reply)
    return 1 if failed else 0


def _report_cancel(ctx: Context, reply: Mapping[str, Any]) -> int:
    """One line per container on stderr; how many could not be cancelled (not found, or
    completed already: a container already cancelled is what was asked for)."""
    failed = 0
    for item in reply["items"]:
        uuid, outcome, state = item["uuid"], item["outcome"], item["state"]
        if outcome == "not_found":
            ctx.error(f"{uuid}: not found")
        elif outcome == "final":
            ctx.error(f"{uuid}: {state} already")
        else:
            ctx.error(f"{uuid}: {state}")
        failed += outcome == "not_found" or state == "Complete"
    return failed


def run_logs(args: argparse.Namespace, ctx: Context) -> int:
    _check_uuid(args.uuid)
    client = open_client(args, ctx)
    with client_errors():
        only = StreamFilter(args.stream) if args.stream else None
        if args.follow:
            return follow(client, ctx, args.uuid, exit_with_container=False, only=only)
        _, final = print_log(client, ctx, args.uuid, 0, only)
        if only is not None and not final:
            ctx.stdout.write(only.end())  # a running container's last, unfinished line
    return 0
