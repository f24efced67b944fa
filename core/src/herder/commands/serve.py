"""``herder serve``: run the dispatcher until interrupted."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from herder.commands import CommandError, Context
from herder.plugins import PluginError

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the dispatcher",
        description="Run the dispatcher: the queue, the scheduler and the worker pool, until "
        "interrupted (SIGINT or SIGTERM).  Instances are left running on exit and adopted again "
        "at the next start.",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from herder.dispatcher import Dispatcher, public_key_from_private
    from herder.runtime import ThreadRuntime

    config = ctx.config
    try:
        public_key = (
            public_key_from_private(config.containers.dispatch_private_key)
            if config.cloud.deploy_public_key and config.containers.dispatch_private_key
            else None
        )
    except ValueError as exc:
        raise CommandError(f"containers.dispatch_private_key: {exc}") from exc
    runtime = ThreadRuntime()
    try:
        dispatcher = Dispatcher(config, runtime=runtime, plugins=ctx.plugins, public_key=public_key)
    except PluginError as exc:
        runtime.shutdown()
        raise CommandError(f"cloud.driver: {exc}") from exc
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    dispatcher.start()
    ctx.error(
        f"herder: serving cluster {config.cluster_id} with driver {config.cloud.driver!r} "
        f"({len(dispatcher.instance_types)} instance types); queue {config.queue.path}"
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        dispatcher.stop()
        runtime.shutdown()
    return 0
