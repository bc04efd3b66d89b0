"""Chunking: read a job's input file once, check it is JSONL within the limits,
and find where each line starts and ends.

Batch-level errors (the whole job fails, no line runs):
    validation_error   a blank line before another line, bytes that are not UTF-8, a line that is
                       not a JSON object (or nested too deeply to read)
    limit_exceeded     the file is over BATCH_MAX_FILE_BYTES, or has over BATCH_MAX_LINES lines
    empty_batch        no lines at all
A line over BATCH_MAX_LINE_BYTES is not read here: it becomes that line's own
invalid_request, as the other lines run.

Accepted as editors and exporters write files: a UTF-8 byte order mark at the start
(skipped) and blank lines at the end (ignored).  Line numbers count from the file's
first line, so a result's line_index is its line in the file, less one.
"""
from __future__ import annotations

from pathlib import Path

import msgspec

VALIDATION_ERROR = "validation_error"
LIMIT_EXCEEDED = "limit_exceeded"
EMPTY_BATCH = "empty_batch"
SKIP_CHUNK = 1 << 20
BOM = b"\xef\xbb\xbf"


class BatchError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def scan(path: Path, max_file_bytes: int, max_lines: int, max_line_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of every line, newline excluded.  Raises BatchError."""
    size = path.stat().st_size
    if size > max_file_bytes:
        raise BatchError(LIMIT_EXCEEDED, f"the file is larger than {max_file_bytes} bytes")
    spans: list[tuple[int, int]] = []
    blank_at = 0  # the first of the blank lines just read (1-based); fine only if no line follows
    with open(path, "rb") as f:
        offset = len(BOM) if f.read(len(BOM)) == BOM else 0
        f.seek(offset)
        while offset < size:
            if len(spans) >= max_lines:
                raise BatchError(LIMIT_EXCEEDED, f"the file has more than {max_lines} lines")
            raw = f.readline(max_line_bytes + 2)  # + "\r\n": a line just at the limit is read whole
            end = offset + len(raw)
            if not raw.endswith(b"\n") and end < size:  # over the limit: skip to its end, unread
                _no_blank_before(blank_at)
                end = _skip_line(f, end, size)
                spans.append((offset, end - offset - 1))  # a length over the limit marks it
                offset = end
                continue
            line = raw.rstrip(b"\n").rstrip(b"\r")
            offset_before, offset = offset, end
            if not line.strip():
                blank_at = blank_at or len(spans) + 1
                continue
            _no_blank_before(blank_at)
            _check_line(line, len(spans))
            spans.append((offset_before, len(line)))
    if not spans:
        raise BatchError(EMPTY_BATCH, "the file has no lines")
    return spans


def _no_blank_before(blank_at: int) -> None:
    if blank_at:
        raise BatchError(VALIDATION_ERROR, f"line {blank_at} is blank (blank lines may only end the file)")


def _skip_line(f, position: int, size: int) -> int:
    """Read on to just past the next newline (or the end of the file); returns that position."""
    while position < size:
        chunk = f.read(SKIP_CHUNK)
        newline = chunk.find(b"\n")
        if newline >= 0:
            position += newline + 1
            f.seek(position)
            return position
        position += len(chunk)
    return size + 1  # no final newline: as if there were one


def _check_line(line: bytes, index: int) -> None:
    where = f"line {index + 1}"
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        raise BatchError(VALIDATION_ERROR, f"{where} is not valid UTF-8") from None
    try:
        value = msgspec.json.decode(line)
    except msgspec.DecodeError as ex:
        raise BatchError(VALIDATION_ERROR, f"{where} is not valid JSON: {ex}") from None
    except RecursionError:  # thousands of nested brackets: the line's fault, never the worker's
        raise BatchError(VALIDATION_ERROR, f"{where} is nested too deeply") from None
    if not isinstance(value, dict):
        raise BatchError(VALIDATION_ERROR, f"{where} is not a JSON object")
