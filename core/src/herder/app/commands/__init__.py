"""The ``herder`` subcommands, one module per command group.

:data:`COMMANDS` lists every command: its name, its one-line help and the module that defines
it, so that ``herder --help`` lists them all and ``herder submit`` imports only the module of
``submit`` (a client command run in a shell loop starts faster by the modules it never reads).
A command module has one function, ``register(subparsers)``, that adds its parsers with
``subparsers.add_parser(name, ...)`` (the help and aliases come from :data:`COMMANDS`) and sets
``handler=<function>`` on each with ``parser.set_defaults``.  A handler takes ``(args, ctx)``
(:class:`Context`) and returns the exit status.  Add a line to :data:`COMMANDS` to make a command
appear.

User errors (a bad file, an unknown name, an unreachable server) are raised as
:class:`CommandError`: :func:`herder.app.cli.main` prints them on stderr, without a traceback.
Listing commands print a table for people (:func:`render_table`) and take ``--json`` for
scripts (:func:`print_json`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from herder.config import Config
    from herder.model import InstanceType
    from herder.plugin.registry import Plugins

#: The environment variable naming the config file when ``--config`` is not given.
CONFIG_ENV = "HERDER_CONFIG"
#: The file used when neither ``--config`` nor ``$HERDER_CONFIG`` is given, if it exists.
DEFAULT_CONFIG_FILE = "herder.yaml"

Handler = Callable[[argparse.Namespace, "Context"], int]


class Command(NamedTuple):
    """One subcommand, as ``herder --help`` lists it, and the module whose ``register`` defines
    its options and handler (imported only when the command runs or shows its own help).

    ``logs`` False marks a client command, one that only asks the management API and prints
    the answer: nothing it runs logs, so the log is not set up for it (importing :mod:`logging`
    is several milliseconds of a command that should start in well under 100).
    """

    name: str
    help: str
    module: str
    aliases: tuple[str, ...] = ()
    logs: bool = True


_PKG = "herder.app.commands."
#: Every command, in the order ``herder --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command("serve", "run the dispatcher", _PKG + "serve"),
    Command(
        "simulate",
        "run the engine against a simulated cloud, faster than real time",
        _PKG + "simulate",
    ),
    Command("config", "check or show the configuration", _PKG + "config"),
    Command(
        "plugins",
        "list installed plugins and the drivers, executors and boot probes they register",
        _PKG + "plugins",
    ),
    Command("submit", "submit a container", _PKG + "containers", logs=False),
    Command("containers", "list containers", _PKG + "containers", logs=False),
    Command("container", "show one container in detail", _PKG + "containers", logs=False),
    Command("cancel", "cancel containers", _PKG + "containers", logs=False),
    Command("priority", "change a container's priority", _PKG + "containers", logs=False),
    Command("logs", "print a container's log", _PKG + "containers", logs=False),
    Command("instances", "list instances", _PKG + "instances", logs=False),
    Command(
        "instance-types",
        "list the instance types herder may create, with their prices",
        _PKG + "instances",
    ),
    Command(
        "hold",
        "hold instances: start nothing new on them and never shut them down",
        _PKG + "instances",
        logs=False,
    ),
    Command(
        "drain",
        "drain instances: start nothing new, shut each down once idle",
        _PKG + "instances",
        logs=False,
    ),
    # ``run``: the old name, kept for a release.
    Command(
        "resume",
        "return held or draining instances to normal use",
        _PKG + "instances",
        ("run",),
        logs=False,
    ),
    Command(
        "kill", "shut instances down now, whatever runs on them", _PKG + "instances", logs=False
    ),
    Command(
        "costs",
        "spend by period and instance type, and cost per finished container",
        _PKG + "costs",
    ),
    Command(
        "quotas",
        "the cloud account's quotas: limits, usage, and what herder plans to use",
        _PKG + "costs",
    ),
    Command(
        "budget",
        "the spend budget: the period's spend against its soft and hard limits",
        _PKG + "costs",
    ),
    Command(
        "cloudtest",
        "create one instance with the configured driver and check herder can use it",
        _PKG + "cloudtest",
    ),
    Command("queue", "check or back up the queue file", _PKG + "queue"),
    Command(
        "token", "print the management token (for the status page, curl, scripts)", _PKG + "token"
    ),
)


def command(name: str) -> Command:
    """The :data:`COMMANDS` entry named ``name`` (or one of its aliases)."""
    for cmd in COMMANDS:
        if name == cmd.name or name in cmd.aliases:
            return cmd
    raise KeyError(name)


class CommandError(Exception):
    """A user error: printed as ``herder: error: <message>``, exit status ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class Context:
    """What every handler may need, built lazily so that ``herder --version`` stays instant.

    ``config_path`` is the file named by ``--config`` or ``$HERDER_CONFIG``, or ``herder.yaml``
    in the working directory if it exists; None means herder's built-in defaults.  (A plain
    class, not a dataclass: ``dataclasses`` imports ``inspect``, a few milliseconds of every
    command's start.)
    """

    def __init__(
        self,
        config_path: str | None,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        stdin: IO[str] | None = None,
        loaded_plugins: Plugins | None = None,
    ) -> None:
        self.config_path = config_path
        self.stdout: IO[str] = sys.stdout if stdout is None else stdout
        self.stderr: IO[str] = sys.stderr if stderr is None else stderr
        self.stdin: IO[str] = sys.stdin if stdin is None else stdin
        self.loaded_plugins = loaded_plugins
        self._config: Config | None = None

    @property
    def plugins(self) -> Plugins:
        """Every installed plugin (entry points included), unless some were given."""
        if self.loaded_plugins is None:
            from herder.plugin.registry import PluginError, Plugins

            try:
                self.loaded_plugins = Plugins.load()
            except PluginError as exc:
                raise CommandError(f"cannot load plugins: {exc}") from exc
        return self.loaded_plugins

    @property
    def config(self) -> Config:
        """The effective configuration; a broken file is a :class:`CommandError`."""
        return self._load_config(check_plugins=False)

    def checked_config(self) -> Config:
        """:attr:`config`, with the plugin names and the driver's parameters checked too, as
        ``herder config check`` does: what a command that runs the engine needs."""
        return self._load_config(check_plugins=True)

    def _load_config(self, *, check_plugins: bool) -> Config:
        if self._config is None:
            from herder.config import Config, ConfigError, load_config

            if self.config_path is None:
                self._config = Config()
            else:
                plugins = self.plugins if check_plugins else None
                try:
                    self._config = load_config(self.config_path, plugins)
                except ConfigError as exc:
                    raise CommandError(f"invalid configuration:\n{exc}") from exc
        return self._config

    def driver_instance_types(self, config: Config) -> dict[str, InstanceType]:
        """The instance types ``config``'s driver offers when the file lists none (what
        ``serve`` then uses); a driver that cannot be loaded or configured is a
        :class:`CommandError` naming ``cloud.driver``."""
        from herder.plugin.registry import PluginError

        try:
            driver = self.plugins.driver_class(config.cloud.driver)
            params = driver.validate_parameters(config.cloud.driver_parameters)
        except (PluginError, ValueError) as exc:
            raise CommandError(f"cloud.driver: {exc}") from exc
        types: dict[str, InstanceType] = driver().default_instance_types(params)
        return types

    def print(self, text: str = "") -> None:
        """Write a line of the command's output (stdout)."""
        print(text, file=self.stdout)

    def error(self, text: str) -> None:
        """Write a line about something wrong (stderr), so that scripts can keep stdout clean."""
        print(text, file=self.stderr)


def resolve_config_path(option: str | None, environ: dict[str, str] | None = None) -> str | None:
    """``--config``, else ``$HERDER_CONFIG``, else ``./herder.yaml`` if present, else None."""
    if option:
        return option
    env = os.environ if environ is None else environ
    if env.get(CONFIG_ENV):
        return env[CONFIG_ENV]
    if os.path.isfile(DEFAULT_CONFIG_FILE):
        return DEFAULT_CONFIG_FILE
    return None


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; empty cells shown as ``-``.

    Control characters in a cell (a container name is anyone's to choose) are shown escaped,
    so they cannot move the cursor, recolour the terminal or break the table's lines.
    """
    from herder.text import escape_controls

    cells = [[str(h).upper() for h in headers]]
    cells += [
        ["-" if v is None or v == "" else escape_controls(str(v)) for v in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def print_json(ctx: Context, data: Any) -> None:
    """Indented, key-order-preserving JSON for scripts."""
    import json

    ctx.print(json.dumps(data, indent=2))
