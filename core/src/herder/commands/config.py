"""``herder config check`` and ``herder config show``."""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from herder.commands import CommandError, Context
from herder.config import Config, check_config, render_config
from herder.plugins import PluginError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "config",
        help="check or show the configuration",
        description="Check a configuration file, or show the effective configuration.",
    )
    sub = parser.add_subparsers(dest="config_command", metavar="COMMAND", required=True)

    check = sub.add_parser(
        "check",
        help="validate a configuration file and list every problem",
        description="Validate FILE: its keys and values, the driver name and the driver's "
        "parameters.  Prints 'FILE: OK' and exits 0, or prints one line per problem and "
        "exits 1.",
    )
    check.add_argument(
        "file", nargs="?", metavar="FILE", help="the file to check (default: the --config file)"
    )
    check.set_defaults(handler=run_check)

    show = sub.add_parser(
        "show",
        help="print the effective configuration, defaults included",
        description="Print the effective configuration with every default filled in (the "
        "driver's parameters too, when the driver is installed), durations and sizes written "
        "as text.  The management token is redacted.",
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(handler=run_show)


def run_check(args: argparse.Namespace, ctx: Context) -> int:
    path = args.file or ctx.config_path
    if path is None:
        raise CommandError("no configuration file given, and ./herder.yaml does not exist", 2)
    problems = check_config(path, ctx.plugins)
    if not problems:
        ctx.print(f"{path}: OK")
        return 0
    for problem in problems:
        ctx.error(problem.format(path))
    return 1


def run_show(args: argparse.Namespace, ctx: Context) -> int:
    config = ctx.config
    data = render_config(config)
    params = _effective_driver_parameters(ctx, config)
    if params is not None:
        data["cloud"]["driver_parameters"] = params
    if args.json:
        ctx.print(json.dumps(data, indent=2))
    else:
        ctx.print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    return 0


def _effective_driver_parameters(ctx: Context, config: Config) -> dict[str, Any] | None:
    """The driver's parameters with the driver's own defaults filled in, when it can tell.

    Without the driver (not installed, or the parameters are invalid) the file's values are
    shown as written; ``herder config check`` is where such problems are reported.  Drivers
    declare secrets as ``SecretStr`` so that they print as asterisks here.
    """
    try:
        driver = ctx.plugins.driver_class(config.cloud.driver)
        params = driver.validate_parameters(config.cloud.driver_parameters)
    except (CommandError, PluginError, ValueError, TypeError):
        return None
    dumped: dict[str, Any] = params.model_dump(mode="json")
    return dumped
