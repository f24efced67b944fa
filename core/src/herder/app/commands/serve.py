"""``herder serve``: run the dispatcher and its management API until interrupted."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from herder.app.commands import CommandError, Context

if TYPE_CHECKING:
    from collections.abc import Callable

    from herder.app.api.server import APIServer
    from herder.app.embedded import ServeSetup
    from herder.config import Config
    from herder.engine.interface import Engine
    from herder.queue.backend import DispatchLock
    from herder.runtime import ThreadRuntime

log = logging.getLogger("herder.serve")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        description="Run the dispatcher: the queue, the scheduler, the worker pool and the "
        "management API, until interrupted (SIGINT or SIGTERM).  Containers and instances are "
        "left running on exit and adopted again at the next start.  With no configuration file "
        "it runs the embedded default: the loopback driver on this machine, a SQLite queue, and "
        "a generated cluster id, SSH key and management token, all kept in the data directory "
        "($HERDER_DATA_DIR, else $XDG_DATA_HOME/herder, else ~/.local/share/herder).",
    )
    p.add_argument("--data-dir", metavar="DIR", help="where herder keeps its own state")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address of the management API (overrides api.listen; port 0 picks one)",
    )
    p.set_defaults(handler=run, default_log_level="info")


def run(args: argparse.Namespace, ctx: Context) -> int:
    from herder.app.client import default_data_dir
    from herder.app.embedded import prepare_serve

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    # Checked as `config check` does, driver parameters included, so that a bad file stops
    # serve with one line per problem instead of a traceback from deep inside.
    config = ctx.checked_config()
    try:
        setup = prepare_serve(config, data_dir)
        lock = _hold_data_dir(data_dir)
    except OSError as exc:
        raise CommandError(f"data directory {data_dir}: {exc.strerror or exc}") from exc
    try:
        return _serve(args, ctx, setup)
    finally:
        os.close(lock)


#: Where the open-file limit is raised to when the hard limit is "unlimited" (Linux's default
#: fs.nr_open: a soft limit above it is refused).
_NOFILE_CAP = 1 << 20


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to the hard limit; (before, after).

    Each connected instance holds three descriptors -- its socket and the pipe paramiko makes
    so that its resident runner's reader can sleep until data arrives -- so 2,000 instances
    need about 6,000, far past the usual soft limit of 1,024, after which connections fail
    with "Too many open files".  The hard limit is the administrator's; the soft one is only
    a default, which servers commonly raise (as the Go runtime does for every program).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_CAP if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft, soft
    log.info("open-file limit raised from %d to %d", soft, target)
    return soft, target


def _serve(args: argparse.Namespace, ctx: Context, setup: ServeSetup) -> int:
    from herder.app.api.server import APIServer
    from herder.engine.cloud_engine import public_key_from_private
    from herder.runtime import ThreadRuntime

    config, data_dir = setup.config, setup.data_dir
    if args.listen:
        config = config.model_copy(
            update={"api": config.api.model_copy(update={"listen": args.listen})}
        )
    for path in setup.created:
        log.info("created %s", path)
    for failure in ctx.plugins.failures():
        log.warning("plugin not loaded: %s", failure.describe())
    public_key = None
    if config.cloud.deploy_public_key and config.containers.dispatch_private_key:
        try:
            public_key = public_key_from_private(config.containers.dispatch_private_key)
        except ValueError as exc:
            raise CommandError(f"containers.dispatch_private_key: {exc}") from exc

    raise_open_file_limit()
    runtime = ThreadRuntime()
    engine = _build_engine(config, ctx, runtime, public_key)
    api = APIServer(engine, config)
    _start_api(api, config, data_dir, abandon=lambda: _stop_all(engine.stop, runtime))
    stop = _stop_on_signals()
    settle_startup_heap()
    lost: list[str] = []
    if not _take_dispatch_lock(
        engine.dispatch_lock, stop, engine.halt, lost, engine.queue_description
    ):
        _wait_then_stop(stop, api, engine.stop, runtime)
        return 0
    engine.start()
    log.info(
        "serving cluster %s: %s, queue %s, API %s",
        config.cluster_id,
        _what_runs(config, engine),
        engine.queue_description,
        api.url,
    )
    _wait_then_stop(stop, api, engine.stop, runtime)
    if lost:
        raise CommandError(
            f"{lost[0]}; stopped dispatching (start herder again to wait as the standby)"
        )
    if engine.has_instances:
        log.info("stopped; containers and instances left running are adopted at the next start")
    else:
        log.info("stopped; containers left running are taken up again at the next start")
    return 0


def _build_engine(
    config: Config, ctx: Context, runtime: ThreadRuntime, public_key: str | None
) -> Engine:
    """The cloud engine, or the service of the dispatcher a plugin registered (``dispatcher:
    <name>``): the same queue, API and standby either way, through the engine interface.
    A failure to build it stops the runtime and is reported under the key that caused it."""
    from herder.plugin.registry import PluginError
    from herder.queue.base import QueueError

    try:
        if config.dispatcher == "cloud":
            from herder.engine.cloud_engine import CloudEngine

            try:
                return CloudEngine(
                    config, runtime=runtime, plugins=ctx.plugins, public_key=public_key
                )
            except PluginError as exc:
                raise CommandError(f"cloud.driver: {exc}") from exc
        from herder.dispatch.service import DispatchService

        try:
            return DispatchService(config, runtime=runtime, plugins=ctx.plugins)
        except (PluginError, ValueError) as exc:
            if isinstance(exc, QueueError):
                raise
            raise CommandError(f"dispatcher: {exc}") from exc
    except QueueError as exc:
        runtime.shutdown()
        raise CommandError(f"queue: {exc}") from exc
    except BaseException:
        runtime.shutdown()
        raise


def _what_runs(config: Config, engine: Engine) -> str:
    """The start-up log line's account of the engine."""
    if not engine.has_instances:
        return f"dispatcher {config.dispatcher}"
    types = sorted(engine.instance_types)
    return (
        f"driver {config.cloud.driver}, {len(types)} instance type(s) "
        f"({', '.join(types) or 'none'})"
    )


def _take_dispatch_lock(
    lock: DispatchLock | None,
    stop: threading.Event,
    halt: Callable[[], None],
    lost: list[str],
    where: str,
) -> bool:
    """Wait as the standby until this herder holds the dispatch lock (True), serving the API
    meanwhile, or until asked to stop (False).  Without a lock (one dispatcher per queue,
    enforced by the queue itself) there is nothing to wait for.

    Once held, losing the lock halts dispatching at once, from the lock's own thread, records
    why in ``lost`` and stops the process: another herder may be taking over already.
    """
    if lock is None:
        return True
    log.info(
        "standby: waiting for the dispatch lock of queue %s; the API is served meanwhile", where
    )

    def on_lost(reason: str) -> None:
        lost.append(reason)
        log.error("%s: stopping dispatching at once", reason)
        halt()
        stop.set()

    if not lock.acquire(stop, on_lost):
        return False
    log.info("holding the dispatch lock of queue %s: dispatching", where)
    return True


#: Held (flock) by the one ``herder serve`` that uses a data directory, for its whole life.
SERVE_LOCK = "serve.lock"


def _hold_data_dir(data_dir: Path) -> int:
    """Refuse to serve from a data directory another ``herder serve`` is using.

    Two dispatchers on one queue and one set of instances would start containers twice and
    destroy each other's instances.  The lock is an flock, so it goes away with the process,
    however it ends; the file records the holder's pid for the message.
    """
    from herder import lockfile

    try:
        return lockfile.hold(data_dir / SERVE_LOCK)
    except lockfile.LockHeld as held:
        raise CommandError(
            f"another herder serve (pid {held.holder}) is using the data directory {data_dir}; "
            "stop it first, or give this one its own --data-dir"
        ) from None


def _start_api(api: APIServer, config: Config, data_dir: Path, abandon: Callable[[], None]) -> None:
    """Start the management API and write client.json for the CLI.

    A port that cannot be bound stops what was already started (``abandon``) and is reported
    under the key that set it.
    """
    from herder.app.api.server import APIServerError
    from herder.app.client import write_client_file

    try:
        api.start()
    except APIServerError as exc:
        abandon()
        raise CommandError(f"api.listen: {exc}") from exc
    token = config.api.resolve_management_token()
    if token:
        write_client_file(data_dir, api.url, token, config.api.tls_certificate)
    else:
        log.warning(
            "no management token configured (api.management_token or $%s): the API refuses "
            "every request",
            config.api.management_token_env,
        )


def _stop_all(stop_component: Callable[[], None], runtime: ThreadRuntime) -> None:
    stop_component()
    runtime.shutdown()


def _wait_then_stop(
    stop: threading.Event,
    api: APIServer,
    stop_component: Callable[[], None],
    runtime: ThreadRuntime,
) -> None:
    """Serve until SIGINT or SIGTERM, then stop the API, the dispatcher and the runtime."""
    try:
        while not stop.wait(1.0):
            pass
    finally:
        api.stop()
        _stop_all(stop_component, runtime)


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def settle_startup_heap() -> None:
    """Move what start-up loaded out of the garbage collector's generations.

    Modules, configuration and the queue's active containers live as long as the process.
    Left in the collector's generations, they are walked by every full collection, and on a
    long queue the first scheduling pass allocates enough to trigger one: with 100,000 queued
    containers that collection was two thirds of the pass (benchmarks/README.md, §3).
    """
    gc.collect()
    gc.freeze()
