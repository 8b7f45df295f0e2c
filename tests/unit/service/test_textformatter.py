"""The text log format keeps each second's date and time text, and writes exactly what
logging.Formatter(TEXT_FORMAT) writes."""

from __future__ import annotations

import logging
import random
import time

from translator.service.logformat import TEXT_FORMAT, TextFormatter, configure_logging


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord("socks64.access", logging.INFO, __file__, 1, "x %s", ("y",), None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def test_same_lines_as_the_standard_formatter() -> None:
    ours, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    rng = random.Random(7)
    now = time.time()
    instants = [now + i * 0.0137 for i in range(3000)]  # many lines per second
    instants += [now + rng.uniform(-1e7, 1e7) for _ in range(3000)]  # and jumps
    for created in instants:
        record = _record(created)
        assert ours.format(record) == standard.format(record)


def test_an_explicit_date_format_is_honoured() -> None:
    record = _record(time.time())
    assert TextFormatter().formatTime(record, "%Y") == time.strftime("%Y")


def test_configure_logging_uses_it_for_text() -> None:
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        configure_logging("INFO", "text")
        assert isinstance(root.handlers[0].formatter, TextFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
