"""herder's log: one line per event, library noise kept down."""

from __future__ import annotations

import io
import json
import logging
import threading
import traceback
from collections.abc import Iterator

import pytest

from herder.app.logsetup import configure_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _paramiko_style_failure() -> None:
    """What paramiko's transport thread logs when a handshake fails (Transport.run)."""
    log = logging.getLogger("paramiko.transport")
    try:
        raise EOFError("Error reading SSH protocol banner")
    except EOFError as exc:
        log.log(logging.ERROR, "Exception (client): %s", exc)
        for line in "".join(traceback.format_exception(exc)).split("\n"):
            log.log(logging.ERROR, line)


def _run_in_thread(fn) -> None:  # type: ignore[no-untyped-def]
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def test_a_paramiko_traceback_is_one_warning(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    _run_in_thread(_paramiko_style_failure)
    logging.getLogger("herder.ssh").warning("instance i-1: cannot connect: banner timeout")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["logger"], r["level"]) for r in records] == [
        ("paramiko.transport", "warning"),
        ("herder.ssh", "warning"),
    ]
    assert records[0]["message"] == "Exception (client): Error reading SSH protocol banner"


def test_other_library_errors_are_warnings_and_herders_own_are_untouched(
    restore_root: None,
) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    logging.getLogger("paramiko.transport").error("Secsh channel 1 open FAILED")
    logging.getLogger("herder.engine.worker").error("instance i-1: boot failed")
    levels = [json.loads(line)["level"] for line in out.getvalue().splitlines()]
    assert levels == ["warning", "error"]


def test_debug_shows_everything(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    _run_in_thread(_paramiko_style_failure)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) > 5 and {r["level"] for r in records} == {"error"}


def test_text_log_lines_cannot_be_forged(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    reason = "done\n2026-01-01 00:00:00,000 INFO    herder.app.api: token accepted\x1b[2J"
    logging.getLogger("herder.app.api").info("cancelled: %s", reason)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(
        "cancelled: done\\n2026-01-01 00:00:00,000 INFO    herder.app.api: token accepted\\x1b[2J"
    )


def test_tables_show_control_characters_escaped() -> None:
    from herder.app.commands import render_table

    table = render_table(["name", "state"], [["evil\x1b]0;pwned\x07\nrow", "Queued"]])
    assert "\x1b" not in table and "\x07" not in table
    assert table.splitlines()[1].startswith("evil\\x1b]0;pwned\\x07\\nrow")
    assert len(table.splitlines()) == 2


def test_the_cli_leaves_the_callers_logging_as_it_was(restore_root: None) -> None:
    from herder.app import cli

    root = logging.getLogger()
    mine = logging.NullHandler()
    root.handlers[:] = [mine]
    root.setLevel(logging.ERROR)
    assert cli.main(["plugins", "--json"]) == 0
    assert root.handlers == [mine] and root.level == logging.ERROR
