"""The ``herder`` command: global options, and subcommands from :mod:`herder.app.commands`.

Each subcommand group lives in its own module under ``herder.app.commands`` (see that package's
docstring); adding a command means adding a module and one line to
:data:`herder.app.commands.COMMANDS`.  The parser lists every command from that table, and a
command's module is imported only when argparse reaches that command, so ``herder submit``
reads neither ``serve``'s module nor the others'.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from herder import __version__
from herder.app.commands import (
    COMMANDS,
    CONFIG_ENV,
    DEFAULT_CONFIG_FILE,
    Command,
    CommandError,
    Context,
)
from herder.app.commands import resolve_config_path as _resolve_config_path

if TYPE_CHECKING:
    from herder.plugin.registry import Plugins

EXIT_STATUS = """\
exit status, for every command:
  0    done
  1    it failed: the server refused or could not be reached, a name was not found, a
       file was invalid (one line on stderr says what, and what to do)
  2    usage error: an unknown option, a missing or malformed argument
  130  interrupted (Ctrl-C)
  141  stdout was closed early (as by `| head`)
  `submit --wait` exits with the container's own exit code instead (1 if it was cancelled).
errors are printed as `herder: error: <what is wrong>` on stderr; per-item results of
cancel, hold, drain, resume and kill as `<id>: <result>`."""

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "warning"
LOG_FORMATS = ("auto", "text", "json")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose every subcommand also takes the global options.

    So ``herder serve --config FILE`` works as well as ``herder --config FILE serve``.
    Subparsers are built with the parser's own class (argparse's default), so nested groups
    (``herder config check``) get the options too.  A subcommand may define an option of the
    same name for itself: its definition wins (``conflict_handler="resolve"``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("conflict_handler", "resolve")
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help=f"configuration file (default: ${CONFIG_ENV}, or ./{DEFAULT_CONFIG_FILE} if "
            "it exists, else built-in defaults)",
        )
        self.add_argument(
            "--log-level",
            choices=LOG_LEVELS,
            default=argparse.SUPPRESS,
            help=f"how much to log on stderr (default: {DEFAULT_LOG_LEVEL}; info for serve)",
        )
        self.add_argument(
            "--log-format",
            choices=LOG_FORMATS,
            default=argparse.SUPPRESS,
            help="text, json, or auto: text on a terminal, JSON lines otherwise (default: auto)",
        )

    def _get_formatter(self) -> argparse.HelpFormatter:
        """argparse's formatter, given the width argparse would find itself: argparse asks
        :mod:`shutil`, which imports zlib, bz2 and lzma, for every argument added (it checks
        each one's metavar with a formatter), a few milliseconds of every command's start."""
        width = _terminal_columns() - 2  # as HelpFormatter does with shutil's answer
        formatter: argparse.HelpFormatter = self.formatter_class(
            prog=self.prog,
            width=width,  # type: ignore[call-arg]  # every HelpFormatter takes it
        )
        return formatter


class _CommandParser(_Parser):
    """A subcommand's parser, defined by its module's ``register`` only when first used.

    ``herder --help`` lists the commands from :data:`~herder.app.commands.COMMANDS` alone;
    argparse asks the chosen command's parser to parse the rest of the line (``--help``
    included), and that is when its module is imported and its options added.
    """

    def __init__(self, *args: Any, command: Command | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._command = command
        if command is not None:  # ``args.command`` may be a command's own argument (submit's)
            self.set_defaults(herder_command=command)
        self._commands: dict[str, _CommandParser] = {}

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.define()
        return super().parse_known_args(args, namespace)

    def define(self) -> None:
        """Import the command's module and add its options, once."""
        command, self._command = self._command, None
        if command is not None:
            importlib.import_module(command.module).register(_Definitions(self._commands))


class _Definitions:
    """What a command module's ``register`` is given: ``add_parser(name, ...)`` fills in the
    parser already listed for ``name`` (a command of the same module, defined at the same
    time) with the description, usage and epilog the module gives."""

    SETTABLE = frozenset({"description", "usage", "epilog", "formatter_class"})

    def __init__(self, parsers: dict[str, _CommandParser]) -> None:
        self._parsers = parsers

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser = self._parsers.get(name)
        if parser is None:
            raise KeyError(f"{name!r} is not in herder.app.commands.COMMANDS")
        unknown = set(kwargs) - self.SETTABLE
        if unknown:
            raise TypeError(f"{name}: {', '.join(sorted(unknown))} cannot be set here")
        parser._command = None  # being defined now: not again when it runs
        for key, value in kwargs.items():
            setattr(parser, key, value)
        return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``herder`` parser: every command listed, none of their modules imported yet."""
    parser = _Parser(
        prog="herder",
        description="An elastic cloud dispatcher: runs queued containers on cloud VMs it "
        "creates and retires.",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"herder {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_CommandParser
    )
    parsers: dict[str, _CommandParser] = {}
    for cmd in COMMANDS:
        parsers[cmd.name] = subparsers.add_parser(
            cmd.name, aliases=cmd.aliases, help=cmd.help, command=cmd
        )
    for sub in parsers.values():
        sub._commands = parsers
    return parser


def main(argv: Sequence[str] | None = None, *, plugins: Plugins | None = None) -> int:
    """Run one command; return its exit status (0 ok, 1 failure, 2 usage error).

    ``plugins`` replaces the installed plugins (for embedding herder, and for tests).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    level = str(
        getattr(args, "log_level", None) or getattr(args, "default_log_level", DEFAULT_LOG_LEVEL)
    )
    log_setup: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if args.herder_command.logs:
        from herder.app.logsetup import logging_configured

        log_setup = logging_configured(level, getattr(args, "log_format", "auto"))
    with log_setup:
        config_option = getattr(args, "config", None)
        ctx = Context(config_path=_resolve_config_path(config_option), loaded_plugins=plugins)
        try:
            status: int = args.handler(args, ctx)
        except CommandError as exc:
            print(f"herder: error: {exc}", file=sys.stderr)
            return exc.status
        except KeyboardInterrupt:
            print("herder: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            return _stdout_closed()
        return status


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else the terminal's, else 80."""
    import os

    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # no stdout (None), or not a terminal
            columns = 0
    return columns if columns > 0 else 80


def _stdout_closed() -> int:
    """The reader of our output went away (``herder containers | head``): stop quietly.

    stdout is pointed at /dev/null so that the interpreter's final flush at exit does not
    raise again; 141 is what a shell reports for a program ended by SIGPIPE.
    """
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests, embedding)
        pass
    finally:
        os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
