"""``herder cloudtest``: check a driver and a cloud account live, one instance, step by step."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from herder.app.commands import CommandError, Context, print_json, render_table

EPILOG = """\
Steps: build the instance set; look for instances left by an earlier cloudtest (refused unless
--destroy-existing); create one instance; wait until it is listed; check its tags; wait until
the configured executor can log in (verifying the host key or the instance secret); run the boot
probe until it succeeds; deploy the runner agent; run the runner's --list; run --command if
given; destroy the instance and wait until it is no longer listed.  The instance is destroyed
even when a step fails or the run is interrupted (Ctrl-C).

Waiting steps give up after cloud.timeout_booting (or --timeout) and try again every
cloud.probe_interval.  The SSH key is containers.dispatch_private_key, or the key `herder serve`
generates in the data directory.

Exit status: 0 if every step passed, 1 if one failed, 130 if interrupted.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cloudtest",
        description="Check the configured driver and cloud account before production: create "
        "one instance, reach it, run the boot probe and the runner, destroy it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--instance-type",
        metavar="NAME",
        help="configured instance type to create (default: the cheapest)",
    )
    p.add_argument(
        "--instance-set-id",
        metavar="ID",
        help="tag value marking the test's instances (default: zzzzz-zzzzz-zzzzzzcloudtest)",
    )
    p.add_argument("--image-id", metavar="ID", help="image to boot (default: cloud.image_id)")
    p.add_argument(
        "--destroy-existing",
        action="store_true",
        help="destroy instances an earlier cloudtest left behind instead of refusing",
    )
    p.add_argument(
        "--command",
        dest="test_command",
        metavar="CMD",
        default="",
        help="shell command to run on the instance once it has booted",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        help="give up on each waiting step after this long",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="herder's data directory, for the SSH key `herder serve` generates",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run, default_log_level="info")


def run(args: argparse.Namespace, ctx: Context) -> int:
    from pathlib import Path

    from herder.app.client import default_data_dir
    from herder.app.embedded import prepare_serve
    from herder.plugin.registry import PluginError
    from herder.tools.cloudtest import DEFAULT_INSTANCE_SET_ID, CloudTest, CloudtestError, Step

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    config = prepare_serve(ctx.config, data_dir).config

    def progress(step: Step) -> None:
        if not args.json:
            ctx.error(f"{step.name}: {step.status} ({step.duration:.1f}s) {step.detail}".rstrip())

    try:
        test = CloudTest(
            config,
            plugins=ctx.plugins,
            instance_type=args.instance_type,
            instance_set_id=args.instance_set_id or DEFAULT_INSTANCE_SET_ID,
            image_id=args.image_id,
            destroy_existing=args.destroy_existing,
            command=args.test_command,
            timeout=args.timeout,
            on_step=progress,
        )
    except (CloudtestError, PluginError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    report = test.run()
    if args.json:
        print_json(ctx, report.to_json())
    else:
        rows = [[s.name, s.status, f"{s.duration:.1f}s", s.detail] for s in report.steps]
        ctx.print(render_table(["step", "status", "duration", "detail"], rows))
        verdict = "PASSED" if report.ok else "INTERRUPTED" if report.interrupted else "FAILED"
        ctx.print(
            f"cloudtest {verdict}: driver {report.driver}, instance type "
            f"{report.instance_type}, instance {report.instance_id or '-'}"
        )
    sys.stdout.flush()
    if report.interrupted:
        return 130
    return 0 if report.ok else 1
