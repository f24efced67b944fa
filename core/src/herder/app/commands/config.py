"""``herder config check`` and ``herder config show``."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from herder.app.commands import CommandError, Context

if TYPE_CHECKING:
    from herder.config import Config


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "config",
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
        description="Print the configuration herder serve would run with: every default filled "
        "in (the driver's parameters and, when none are configured, the driver's instance types "
        "too), and what serve takes from the data directory (cluster id, queue path, SSH key, "
        "loopback state).  Durations and sizes are written as text; the management token is "
        "redacted.  Nothing is created: values serve has yet to generate are shown as such.",
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.add_argument("--data-dir", metavar="DIR", help="the data directory serve would use")
    show.set_defaults(handler=run_show)


def run_check(args: argparse.Namespace, ctx: Context) -> int:
    path = args.file or ctx.config_path
    if path is None:
        raise CommandError("no configuration file given, and ./herder.yaml does not exist", 2)
    from herder.config import check_config

    problems = check_config(path, ctx.plugins)
    if not problems:
        from herder.config import deprecations, load_config

        for warning in deprecations(load_config(path, ctx.plugins)):
            ctx.error(f"{path}: warning: {warning}")
        ctx.print(f"{path}: OK")
        return 0
    for problem in problems:
        ctx.error(problem.format(path))
    return 1


def run_show(args: argparse.Namespace, ctx: Context) -> int:
    from pathlib import Path

    import yaml

    from herder.app.client import default_data_dir
    from herder.app.embedded import CLUSTER_ID_FILE, NOT_YET, TOKEN_FILE, prepare_serve
    from herder.config import render_config

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    setup = prepare_serve(ctx.config, data_dir, create=False)
    config = setup.config
    data = render_config(config)
    if CLUSTER_ID_FILE in setup.pending:
        data["cluster_id"] = NOT_YET
    if TOKEN_FILE in setup.pending:
        data["api"]["management_token"] = NOT_YET
    params = _effective_driver_parameters(ctx, config)
    if params is not None:
        data["cloud"]["driver_parameters"] = params
    else:  # shown as written: whatever looks like a secret is still not printed
        data["cloud"]["driver_parameters"] = _redact_secrets(data["cloud"]["driver_parameters"])
    if not config.instance_types:
        data["instance_types"] = _driver_instance_types(ctx, config)
    if args.json:
        ctx.print(json.dumps(data, indent=2))
    else:
        ctx.print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    return 0


_SECRET_WORDS = ("secret", "password", "token", "credential", "private_key", "access_key")
_REFERENCE_SUFFIXES = ("_file", "_env", "_path", "_id")


def _redact_secrets(value: Any) -> Any:
    """Parameters the driver could not check, with values under secret-looking names redacted
    (a name that refers to a secret, such as ``client_secret_file``, is shown)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key).lower()
            secret = any(word in name for word in _SECRET_WORDS)
            if secret and not name.endswith(_REFERENCE_SUFFIXES) and item not in ("", None):
                out[key] = "<redacted>"
            else:
                out[key] = _redact_secrets(item)
        return out
    if isinstance(value, list):
        return [_redact_secrets(item) for item in value]
    return value


def _driver_instance_types(ctx: Context, config: Config) -> dict[str, Any]:
    """The instance types the driver offers when the file lists none, as the file would say
    them (``serve`` uses exactly these); empty when the driver cannot tell."""
    from herder.config import InstanceTypeConfig, render_config

    try:
        types = ctx.driver_instance_types(config)
    except (CommandError, ValueError, TypeError, OSError):
        return {}
    out: dict[str, Any] = {}
    for name, it in types.items():
        as_config = InstanceTypeConfig.model_validate(
            {
                "provider_type": it.provider_type,
                "vcpus": it.vcpus,
                "ram": it.ram,
                "included_scratch": it.included_scratch,
                "added_scratch": it.added_scratch,
                "price": it.price,
                "preemptible": it.preemptible,
                "gpu": {
                    "stack": it.gpu.stack,
                    "driver_version": it.gpu.driver_version,
                    "hardware_target": it.gpu.hardware_target,
                    "device_count": it.gpu.device_count,
                    "vram": it.gpu.vram,
                },
            }
        )
        out[name] = render_config(as_config)
    return out


def _effective_driver_parameters(ctx: Context, config: Config) -> dict[str, Any] | None:
    """The driver's parameters with the driver's own defaults filled in, when it can tell.

    Without the driver (not installed, or the parameters are invalid) the file's values are
    shown as written; ``herder config check`` is where such problems are reported.  Drivers
    declare secrets as ``SecretStr`` so that they print as asterisks here.
    """
    from herder.plugin.registry import PluginError

    try:
        driver = ctx.plugins.driver_class(config.cloud.driver)
        params = driver.validate_parameters(config.cloud.driver_parameters)
    except (CommandError, PluginError, ValueError, TypeError):
        return None
    dumped: dict[str, Any] = params.model_dump(mode="json")
    return dumped
