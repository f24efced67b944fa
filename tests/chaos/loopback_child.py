"""``herder serve`` on the loopback driver, with SSH outages injected under the running dispatcher.

Usage::

    python tests/chaos/loopback_child.py OUTAGE_DIR HERDER_ARGS...

It runs ``herder HERDER_ARGS`` (``serve --config ...``) in this process through herder's own
:func:`herder.app.cli.main`, with the installed plugins plus one driver, ``loopback-chaos``: the
loopback driver whose instance set also watches ``OUTAGE_DIR`` for outage requests.  The SSH
servers of loopback instances live inside the dispatcher process, so only code in that process
can take them down; everything else (the parent's SIGKILLs, submissions, checks) happens outside,
in :mod:`loopback_chaos`.

The protocol is files, so that requests survive the dispatcher being SIGKILLed and restarted:

* the parent writes ``<n>.request``: ``{"instance": ID, "seconds": S}``;
* this process renames it to ``<n>.taken`` and, in a thread of its own, stops the instance's
  SSH server (:meth:`LoopbackInstanceSet.stop_ssh`), waits ``S`` seconds, starts it again
  (:meth:`LoopbackInstanceSet.start_ssh`), and writes ``<n>.done``:
  ``{"instance", "stopped", "started", "down_ns", "up_ns"}`` (``stopped`` false: the instance
  was gone or already down).

A request taken by a process that was then killed stays ``.taken`` with no ``.done``: the
outage was cut short by the restart (a new instance set starts every server), and the parent
does not count it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from herder_driver_loopback.driver import LoopbackDriver, LoopbackInstanceSet

from herder.app.cli import main
from herder.plugin.cloud import CloudError, DriverContext, DriverParameters
from herder.plugin.hookspecs import hookimpl
from herder.plugin.registry import Plugins, Registry

DRIVER_NAME = "loopback-chaos"
OUTAGE_DIR_ENV = "HERDER_CHAOS_OUTAGE_DIR"
POLL_SECONDS = 0.05

log = logging.getLogger("herder.chaos")


class OutageInjector:
    """Carries out the outage requests the parent drops into a directory, one at a time."""

    def __init__(self, instance_set: LoopbackInstanceSet, directory: Path) -> None:
        self._set = instance_set
        self._dir = directory
        self._thread = threading.Thread(target=self._run, name="chaos-ssh-outages", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        """Take each request as it appears; outages may overlap, as real ones do."""
        while True:
            for request in sorted(self._dir.glob("*.request")):
                taken = request.with_suffix(".taken")
                os.replace(request, taken)
                threading.Thread(
                    target=self._carry_out, args=(taken,), name="chaos-ssh-outage", daemon=True
                ).start()
            time.sleep(POLL_SECONDS)

    def _carry_out(self, taken: Path) -> None:
        # CloudError: the instance set was stopped, the dispatcher is shutting down.
        with contextlib.suppress(CloudError):
            self._outage(taken)

    def _outage(self, taken: Path) -> None:
        doc = json.loads(taken.read_text())
        instance_id, seconds = str(doc["instance"]), float(doc["seconds"])
        down_ns = time.time_ns()
        stopped = self._set.stop_ssh(instance_id)
        if stopped:
            log.warning("chaos: SSH server of %s down for %.1fs", instance_id, seconds)
            time.sleep(seconds)
        up_ns = time.time_ns()
        started = self._set.start_ssh(instance_id) if stopped else False
        result = {
            "instance": instance_id,
            "stopped": stopped,
            "started": started,
            "down_ns": down_ns,
            "up_ns": up_ns,
        }
        tmp = taken.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, taken.with_suffix(".done"))


class ChaosLoopbackDriver(LoopbackDriver):
    """The loopback driver, plus an :class:`OutageInjector` on every instance set it builds."""

    def instance_set(self, params: DriverParameters, context: DriverContext) -> LoopbackInstanceSet:
        instance_set = super().instance_set(params, context)
        OutageInjector(instance_set, Path(os.environ[OUTAGE_DIR_ENV])).start()
        return instance_set


@hookimpl
def herder_register_drivers(registry: Registry) -> None:
    registry.add(DRIVER_NAME, ChaosLoopbackDriver, "loopback with injected SSH outages")


def run(argv: list[str]) -> int:
    """``herder ARGV`` with the chaos driver registered; outage requests come from argv[0]."""
    outage_dir, herder_args = argv[0], argv[1:]
    os.environ[OUTAGE_DIR_ENV] = outage_dir
    plugins = Plugins.load(extra=[sys.modules[__name__]])
    return main(herder_args, plugins=plugins)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
