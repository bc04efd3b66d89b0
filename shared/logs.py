"""Logging set-up shared by every process.

Each process calls `setup_logging("broker", config)` once.  Lines go to stderr
(supervisord writes them to the run directory).  LOG_FORMAT=json gives one JSON
object per line, for log collectors; anything else gives plain text.

`log_request` writes the one line per finished request that operators grep for:
request id, outcome and how long each stage took.

Values a client chose (a URL path, a header) end up in log messages, so every
line is made unforgeable: the text format escapes control characters (a CR/LF
in a path cannot start a fake line) and indents the lines of a traceback; the
JSON format escapes them by construction (json.dumps).

Secrets (API key, worker secret) are never passed to a logger by our code;
`redact` exists for the rare place that must print a config-like value.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

# Fields of a LogRecord that are not user-supplied `extra=` values.
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

_SECRET_WORDS = ("secret", "api_key", "token", "password", "auth")

# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    r"""`text` on one line: each control character written as an escape (\x0d, \u2028)."""
    return _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, process, logger, msg, plus any `extra=` fields."""

    def __init__(self, process_name: str):
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "process": self.process_name,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(redact(entry), default=str)


class TextFormatter(logging.Formatter):
    """Plain text; `extra=` fields are appended as key=value so nothing is lost."""

    def __init__(self, process_name: str):
        super().__init__(f"%(asctime)s %(levelname)s {process_name}[%(process)d] %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The record's own line: one line, whatever the message's arguments held.
        line = super().formatMessage(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in redact(extras).items())
        return escape_controls(line)

    def formatException(self, exc_info) -> str:
        # A traceback keeps its lines, but indented: only a record's first line
        # starts at the margin, so an exception message cannot pass for a record.
        lines = super().formatException(exc_info).split("\n")
        return "\n".join("  " + escape_controls(line) for line in lines)

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("  " + escape_controls(line) for line in stack_info.split("\n"))


def redact(values: dict) -> dict:
    """Copy of `values` with anything that looks like a credential replaced by '***'."""
    return {k: ("***" if any(word in k.lower() for word in _SECRET_WORDS) and v else v) for k, v in values.items()}


def setup_logging(process_name: str, config=None) -> logging.Logger:
    """Configure the root logger for this process and return a logger named after it."""
    level = getattr(config, "log_level", os.environ.get("LOG_LEVEL", "INFO"))
    fmt = getattr(config, "log_format", os.environ.get("LOG_FORMAT", "text"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name) if str(fmt).lower() == "json" else TextFormatter(process_name))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric_level = logging.getLevelName(str(level).upper())
    root.setLevel(numeric_level if isinstance(numeric_level, int) else logging.INFO)
    return logging.getLogger(process_name)


def log_request(logger: logging.Logger, request_id: str, outcome: str, timings_ms: dict[str, float], **fields: Any) -> None:
    """One line per finished request.  `timings_ms` maps stage -> milliseconds
    (e.g. queue, preprocess, gpu, total); `fields` adds skill, status, worker, ..."""
    stages = {f"{stage}_ms": round(ms, 1) for stage, ms in timings_ms.items() if ms is not None}
    extra = {"request_id": request_id, "outcome": outcome, **fields, **stages}
    logger.info("request done", extra={"event": "request_done", **_rename_reserved(extra)})


def _rename_reserved(extra: dict) -> dict:
    # `extra=` may not overwrite LogRecord attributes (e.g. "message", "process").
    return {(f"{k}_" if k in _STANDARD_ATTRS else k): v for k, v in extra.items()}


def ms_since(start: float, end: float | None = None) -> float:
    """Milliseconds between two time.monotonic() values (end defaults to now)."""
    return ((end if end is not None else time.monotonic()) - start) * 1000.0
