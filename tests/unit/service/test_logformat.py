"""--log-format: text lines, or one JSON object per line with the access fields as keys."""

from __future__ import annotations

import json
import logging

import pytest

from translator.gateway.accesslog import SessionRecord
from translator.metrics import Metrics
from translator.service.logformat import JsonFormatter, configure_logging


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("socks64.access", logging.INFO, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_time_level_logger_and_message() -> None:
    document = json.loads(JsonFormatter().format(_record("hello\nworld")))
    assert document["level"] == "INFO"
    assert document["logger"] == "socks64.access"
    assert document["message"] == "hello\nworld"
    assert document["time"].endswith("+00:00")


def test_json_access_fields_become_keys() -> None:
    line = JsonFormatter().format(_record("x", access={"client": "127.0.0.1:5", "up": 3}))
    assert "\n" not in line
    document = json.loads(line)
    assert document["client"] == "127.0.0.1:5" and document["up"] == 3


def test_json_exceptions_are_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record("failed")
        record.exc_info = sys.exc_info()
    document = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in document["exception"]


def test_the_access_line_names_everything_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(process=False)
    caplog.set_level(logging.INFO, logger="socks64.access")
    record = SessionRecord("127.0.0.1:4000", "ipv4", metrics)
    record.doing("CONNECT")
    record.requested, record.reached, record.destination_family = (
        "web6.test:80",
        "[::1]:80",
        "ipv6",
    )
    record.up, record.down, record.end = 10, 20, "ok"
    record.finish()
    (line,) = [r for r in caplog.records if r.name == "socks64.access"]
    text = line.getMessage()
    for part in ("127.0.0.1:4000", "CONNECT", "web6.test:80", "[::1]:80", "ipv4->ipv6"):
        assert part in text
    assert "up=10 down=20" in text and text.endswith("ok")
    assert line.access.fields()["destination_family"] == "ipv6"  # type: ignore[attr-defined]
    refused = SessionRecord("127.0.0.1:4001", "ipv4", metrics)
    refused.refused(2, "denied by policy (default deny)")
    refused.finish()
    assert caplog.records[-1].getMessage().endswith(
        "refused REP 2 NOT_ALLOWED: denied by policy (default deny)"
    )


def test_configure_logging_replaces_handlers() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("WARNING", "json")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.WARNING
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
