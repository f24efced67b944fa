"""How herder writes its log: readable lines on a terminal, JSON lines for log collectors.

Every engine message names what it is about in its text (instance id, container uuid); the
JSON form also carries them as the ``instance`` and ``container`` fields, so collectors can
filter on them.  Workers attach ``instance`` with ``extra=``; the container a message names is
found by :class:`IdFields`, in one place, so no message can forget it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

from herder.text import escape_controls

#: Attributes every LogRecord has; anything else was passed with ``extra=`` and is kept.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


#: A container uuid anywhere in a message (the model's pattern, unanchored).
_CONTAINER_IN_TEXT = re.compile(r"\b[a-z0-9]{5}-dz642-[a-z0-9]{15}\b")


class IdFields(logging.Filter):
    """Attaches the container uuid a message names as its ``container`` field.

    Engine messages name the container they are about in their text ("%s: unlocking container
    because ..."); extracting it here gives every such record the field without each of them
    repeating ``extra=``.  A field given explicitly wins.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "container", None) is None:
            found = _CONTAINER_IN_TEXT.search(record.getMessage())
            if found is not None:
                record.container = found.group(0)
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, exception, extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        return json.dumps(doc)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """The text form: one line per record, whatever its message holds (tracebacks excepted)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


#: Loggers of libraries whose failures herder reports itself, in its own words.
_LIBRARIES = ("paramiko", "herder.ssh.server.transport", "uvicorn")
#: How paramiko's transport thread announces the error it then logs line by line.
_HEADLINE = re.compile(r"^(Exception \((client|server)\)|Socket exception|Unknown exception):")


class LibraryNoise(logging.Filter):
    """Keeps paramiko's failure reports to one warning line each.

    When an SSH connection fails, paramiko's transport thread logs the error at ERROR level and
    then its traceback at ERROR again, one record per line, a dozen records for one event that
    the caller also raises to herder, which logs it once with what to do.  The headline is kept
    and the traceback lines that follow it in the same thread are dropped; what a library
    still logs at ERROR or above is shown as a warning.  (Only when not debugging:
    ``--log-level debug`` shows everything.)
    """

    def __init__(self) -> None:
        super().__init__()
        self._after_headline = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_LIBRARIES) or record.levelno < logging.ERROR:
            return True
        if _HEADLINE.match(record.getMessage()):
            self._after_headline.active = True
        elif getattr(self._after_headline, "active", False):
            return False  # a traceback line of the headline: herder reports the error itself
        # A library's failure is herder's to judge: at most a warning from the library.
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(level: str, fmt: str = "auto", stream: IO[str] | None = None) -> None:
    """Send herder's log to ``stream`` (stderr) at ``level`` in ``fmt`` (auto, text or json).

    ``auto`` is text on a terminal and JSON otherwise (a service manager, a pipe to a collector).
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    handler.addFilter(IdFields())
    if level != "debug":
        handler.addFilter(LibraryNoise())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # Libraries' chatter is only interesting when debugging herder itself.
    for noisy in _LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


@contextlib.contextmanager
def logging_configured(level: str, fmt: str = "auto") -> Iterator[None]:
    """:func:`configure_logging` for the duration of one command, then the logging set-up as
    it was: a program that runs herder's CLI in-process (tests among them) keeps its own
    handlers, and none is left writing to a stream that has since been closed."""
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name).level for name in _LIBRARIES}
    configure_logging(level, fmt)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        for name, library_level in libraries.items():
            logging.getLogger(name).setLevel(library_level)
