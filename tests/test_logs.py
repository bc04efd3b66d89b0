"""shared/logs.py: a value a client chose cannot forge a log line, in either format."""
from __future__ import annotations

import json
import logging
import sys

import pytest

from shared.logs import JsonFormatter, TextFormatter

FORGED = "2026-01-01 00:00:00,000 ERROR frontend[1] frontend: forged"


def forging_record() -> logging.LogRecord:
    try:
        raise ValueError(f"bad value\r\n{FORGED}")
    except ValueError:
        record = logging.getLogger("frontend").makeRecord(
            "frontend", logging.ERROR, __file__, 1, "%s %s", ("GET", f"/zz\r\n{FORGED}\u2028\x85"),
            exc_info=sys.exc_info(), extra={"request_id": f"id\n{FORGED}"})
    return record


def test_text_format_keeps_a_record_on_its_first_line():
    text = TextFormatter("frontend").format(forging_record())
    first, *rest = text.split("\n")
    assert "GET /zz\\x0d\\x0a2026-01-01" in first and "\\u2028\\x85" in first
    assert "request_id=id\\x0a2026-01-01" in first
    assert rest, "the traceback is kept"
    assert all(line.startswith("  ") for line in rest), rest  # only a record starts at the margin
    assert "\r" not in text


@pytest.mark.parametrize("with_exception", [True, False])
def test_json_format_is_one_line_with_the_values_intact(with_exception):
    record = forging_record()
    if not with_exception:
        record.exc_info = None
    line = JsonFormatter("frontend").format(record)
    assert "\n" not in line and "\r" not in line
    entry = json.loads(line)
    assert entry["msg"] == f"GET /zz\r\n{FORGED}\u2028\x85"
    assert entry["request_id"] == f"id\n{FORGED}"
