"""The command-line protocol between herder and the runner agent on an instance (SPEC §11).

It is the crunch-run protocol, so herder could also drive Arvados' own crunch-run, plus two
verbs and one ``--list`` line that let herder *pull* results, so an instance never needs a route
back to the dispatcher nor its credentials:

``<runner> --list [--stdin-prices]``
    one line per container the runner knows about:
    ``<uuid>`` (running), ``<uuid> stale`` (process gone, lock still held), ``broken`` (instance
    cannot run containers) and, herder's addition, ``<uuid> exited <code>`` (finished, result
    not collected yet), and ``<uuid> failed <side> <message>`` (the container could not be
    started: ``instance`` when this instance cannot run containers, ``container`` when the
    container cannot run anywhere, e.g. no such image; never an exit code, which a program may
    also return), and ``<uuid> pulled <seconds>`` (how long pulling its image took).  Older
    parsers ignore the extra lines: they have more than one token and the
    second is not ``stale``.
``<runner> --detach --stdin-config [args...] <uuid>``
    start the container described by the JSON document on stdin, in the background, and return.
``<runner> --kill <signal> <uuid>``
    signal it; exit 0 once it is gone (or never existed).
``<runner> --log <uuid>``
    print the container's output (herder's addition).
``<runner> --forget <uuid>``
    delete the exit record and log once collected (herder's addition).
``<runner> --serve``
    herder's addition: the verbs above as JSON lines on one long-running process
    (``{"id", "argv", "stdin"}`` in, ``{"id", "status", "stdout", "stderr"}`` out, the byte
    strings base64), so a verb costs a message instead of a command.  See
    :mod:`herder.engine.worker.runner_client`.

Every argument that comes from data is a validated UUID or is quoted with :func:`shlex.quote`.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any

from herder.model import Container, InstanceType, is_container_uuid

#: Who a failure to start a container is blamed on (see ``failed`` above).
FAILURE_INSTANCE = "instance"
FAILURE_CONTAINER = "container"
FAILURE_SIDES = (FAILURE_INSTANCE, FAILURE_CONTAINER)


def _sudo(remote_user: str) -> str:
    return "" if remote_user == "root" else "sudo "


def _checked(uuid: str) -> str:
    if not is_container_uuid(uuid):
        raise ValueError(f"refusing to put malformed container uuid {uuid!r} in a command")
    return uuid


# The verbs as argument lists: what a resident runner (``--serve``) receives as they are, and
# what :func:`command_line` turns into a shell command for one-shot use.


def list_argv(with_prices: bool = False) -> list[str]:
    return ["--list", "--stdin-prices"] if with_prices else ["--list"]


def detach_argv(args: list[str], uuid: str) -> list[str]:
    return ["--detach", "--stdin-config", *args, _checked(uuid)]


def kill_argv(signal: int, uuid: str) -> list[str]:
    return ["--kill", str(int(signal)), _checked(uuid)]


def log_argv(uuid: str) -> list[str]:
    return ["--log", _checked(uuid)]


def forget_argv(uuid: str) -> list[str]:
    return ["--forget", _checked(uuid)]


SERVE_ARGV = ["--serve"]


def command_line(runner: str, remote_user: str, argv: list[str]) -> str:
    """The shell command running ``runner`` with ``argv``; every argument is quoted."""
    return f"{_sudo(remote_user)}{runner} " + " ".join(shlex.quote(a) for a in argv)


def list_command(runner: str, remote_user: str, with_prices: bool = False) -> str:
    return command_line(runner, remote_user, list_argv(with_prices))


def detach_command(runner: str, remote_user: str, args: list[str], uuid: str) -> str:
    return command_line(runner, remote_user, detach_argv(args, uuid))


def kill_command(runner: str, remote_user: str, signal: int, uuid: str) -> str:
    return command_line(runner, remote_user, kill_argv(signal, uuid))


def log_command(runner: str, remote_user: str, uuid: str) -> str:
    return command_line(runner, remote_user, log_argv(uuid))


def forget_command(runner: str, remote_user: str, uuid: str) -> str:
    return command_line(runner, remote_user, forget_argv(uuid))


def config_document(
    container: Container,
    instance_type: InstanceType,
    runtime_engine: str = "auto",
    log_limit: int = 0,
    pull_policy: str = "if-not-present",
) -> bytes:
    """The JSON document sent on the stdin of ``--detach``: everything the runner needs.

    ``log_limit`` (bytes, 0 for none) is where the runner stops writing the container's
    output, with a "truncated" line, so that the log stays bounded on the instance too.
    """
    spec = container.spec
    doc: dict[str, Any] = {
        "uuid": container.uuid,
        "command": list(spec.command),
        "image": spec.image,
        "environment": dict(spec.environment),
        "cwd": spec.cwd,
        "runtime": spec.runtime or runtime_engine,
        "max_run_time": spec.scheduling_parameters.max_run_time,
        "vcpus": spec.runtime_constraints.vcpus,
        "ram": spec.runtime_constraints.ram,
        # What the engine must give the container: the GPUs it asked for, of its stack.
        "gpus": {
            "stack": spec.runtime_constraints.gpu.stack,
            "device_count": spec.runtime_constraints.gpu.device_count,
        },
        "instance_type": instance_type.to_json(),
        "log_limit": log_limit,
        # When the runner pulls the image: the container's own policy, else the default.
        "pull_policy": spec.pull_policy or pull_policy,
    }
    return json.dumps(doc, sort_keys=True).encode()


@dataclass
class ListResult:
    """Parsed ``--list`` output."""

    running: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    exited: dict[str, int] = field(default_factory=dict)
    #: uuid -> (side, message) of containers that could not be started
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: uuid -> seconds the runner took to pull the container's image
    pulled: dict[str, float] = field(default_factory=dict)
    broken: bool = False


def parse_list_output(text: str, cluster_id: str) -> ListResult:
    """Parse ``--list`` output (SPEC §3.5), ignoring other clusters' containers.

    ``broken`` is honoured before the cluster filter (it describes the instance).  Lines with
    unexpected shapes are ignored, as Arvados does, so newer runners can add lines.
    """
    result = ListResult()
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        if line == "broken":
            result.broken = True
            continue
        if not line.startswith(cluster_id):
            continue
        tokens = line.split()
        if len(tokens) == 1:
            result.running.append(tokens[0])
        elif len(tokens) == 2 and tokens[1] == "stale":
            result.stale.append(tokens[0])
        elif len(tokens) >= 3 and tokens[1] == "failed" and tokens[2] in FAILURE_SIDES:
            message = line.split(None, 3)[3] if len(tokens) > 3 else ""
            result.failed[tokens[0]] = (tokens[2], message)
        elif len(tokens) == 3 and tokens[1] == "pulled":
            try:
                result.pulled[tokens[0]] = float(tokens[2])
            except ValueError:
                continue
        elif len(tokens) == 3 and tokens[1] == "exited":
            try:
                result.exited[tokens[0]] = int(tokens[2])
            except ValueError:
                continue
    return result


#: What a command gets of this process's environment when the client sends none, as sshd
#: gives a login: who and where the user is, and how to find programs.  Nothing else of the
#: dispatcher's environment (its management token, cloud credentials) reaches a command, the
#: runner it starts, or the containers that runner starts.
LOGIN_VARIABLES = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TZ", "TMPDIR")


def login_environment() -> dict[str, str]:
    """The variables of :data:`LOGIN_VARIABLES` that this process has."""
    return {name: os.environ[name] for name in LOGIN_VARIABLES if name in os.environ}
