"""How herder writes its log: readable lines on a terminal, JSON lines for log collectors.

Every engine message names what it is about in its text (instance id, container uuid); the
JSON form also carries them as the ``instance`` and ``container`` fields, so collectors can
filter on them.  Workers attach ``instance`` with ``extra=``; the container a message names is
found by :class:`IdFields`, in one place, so no message can forget it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any

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


def configure_logging(level: str, fmt: str = "auto", stream: IO[str] | None = None) -> None:
    """Send herder's log to ``stream`` (stderr) at ``level`` in ``fmt`` (auto, text or json).

    ``auto`` is text on a terminal and JSON otherwise (a service manager, a pipe to a collector).
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(IdFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # Libraries' chatter is only interesting when debugging herder itself.
    for noisy in ("paramiko", "herder.ssh.server.transport"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
