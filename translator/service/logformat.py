"""``--log-format text|json``: one line per record either way.

JSON lines carry the time, level, logger and message, plus the access-log fields of a
finished session (``record.access``) as keys of their own, so a log shipper needs no
pattern to read them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, byte for byte, with the date and time of the current second kept:
    localtime() and strftime() per line are a good part of an access line's cost (one per
    session), and a busy gateway writes many lines per second."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        # (second, its text): one reference, swapped whole (other threads log too)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:  # as logging.Formatter decides
            return super().formatTime(record, datefmt)
        second, text = self._second
        if int(record.created) != second:
            # localtime() of any instant within one second gives that second's fields
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (int(record.created), text)
        msec_format = self.default_msec_format
        return msec_format % (text, record.msecs) if msec_format else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        access: Any = getattr(record, "access", None)  # a finished session's SessionRecord
        if hasattr(access, "fields"):
            access = access.fields()
        if isinstance(access, dict):
            document.update(access)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
