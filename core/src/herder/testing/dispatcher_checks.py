"""Checks a probing dispatcher plugin's tests run, so each plugin does not write them again.

A dispatcher built on :class:`herder.dispatch.ProbingBackend` takes its parameters through a
model derived from :class:`herder.dispatch.ProbingParameters`; ``herder config check`` must
name each bad key under ``dispatcher_parameters``, with the close match for a misspelling, as
an operator sees it (the real command line, with the installed plugins discovered).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path


def check_config_names_bad_dispatcher_parameters(dispatcher: str, directory: Path) -> None:
    """Run ``herder config check`` on a file with bad ``dispatcher_parameters`` for the
    installed dispatcher ``dispatcher`` and assert what it reports, then on a good one."""
    from herder.app import cli

    path = directory / "herder.yaml"
    path.write_text(
        f"dispatcher: {dispatcher}\n"
        "dispatcher_parameters: {vcpus: -1, probe_intervl: 2}\n"
        "queue: {backend: sqlite, backend_parameters: {path: x}}\n"
    )
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli.main(["config", "check", str(path)])
    report = err.getvalue()
    assert status == 1, report
    assert f"{path}: dispatcher_parameters.vcpus: " in report, report
    misspelt = "dispatcher_parameters.probe_intervl: unknown key (did you mean 'probe_interval'?)"
    assert f"{path}: {misspelt}" in report, report
    assert f"{path}: queue.backend_parameters.path: " in report, report
    path.write_text(f"dispatcher: {dispatcher}\ndispatcher_parameters: {{vcpus: 2}}\n")
    with contextlib.redirect_stderr(io.StringIO()) as out:
        assert cli.main(["config", "check", str(path)]) == 0, out.getvalue()
