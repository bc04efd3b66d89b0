"""The Batch API's bodies as msgspec Structs: the one request body the front end
decodes (mpu-complete's part list), and the answers frontend/batch_api.py and
the batch worker write, which /openapi.json describes (frontend/batch_openapi.py)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

import msgspec
from msgspec import UNSET, UnsetType

# GET /v1/batch: jobs per page (`limit`), and the largest cursor (SQLite's largest integer).
LIST_DEFAULT, LIST_MAX = 20, 100
MAX_CURSOR = 2 ** 63 - 1

BatchStatus = Literal["chunking", "processing", "completed", "failed", "cancelled"]


# ---------------------------------------------------------------- request
class Part(msgspec.Struct, rename="camel"):
    part_number: int
    etag: str  # as PUT ...?action=mpu-uploadpart answered it (quotes allowed)


class CompleteBody(msgspec.Struct):
    """The parts that make the file, in ascending partNumber order."""

    parts: list[Part]


# ---------------------------------------------------------------- answers (documentation only)
class UploadCreated(msgspec.Struct, rename="camel"):
    file_id: str
    upload_id: str


class PartUploaded(msgspec.Struct, rename="camel"):
    etag: str  # MD5 of the part, hex
    part_number: int


class UploadCompleted(msgspec.Struct):
    """The job the completed upload became; its id is the batch id."""

    id: str
    status: BatchStatus


class UploadAborted(msgspec.Struct, rename="camel"):
    file_id: str
    status: Literal["aborted"]


class BatchProgress(msgspec.Struct):
    total: int  # lines in the file (0 while chunking)
    completed: int
    failed: int


class BatchUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int


class BatchOutput(msgspec.Struct):
    """A JSONL result file: result lines index*10000 .. index*10000+9999."""

    index: int
    url: str


class BatchError(msgspec.Struct):
    code: str
    message: str


class BatchJob(msgspec.Struct):
    """A batch job; times are ISO 8601 UTC."""

    id: str
    status: BatchStatus
    progress: BatchProgress
    usage: BatchUsage
    outputs: list[BatchOutput]  # empty until a line has a result
    created_at: str
    completed_at: Optional[str]
    expires_at: Optional[str]
    error: Union[BatchError, UnsetType] = UNSET  # a failed job: validation_error, limit_exceeded, empty_batch


class BatchList(msgspec.Struct):
    """Jobs, newest first; pass next_cursor as `cursor` for the next page."""

    data: list[BatchJob]
    has_more: bool
    next_cursor: Optional[str]


class ResultLineOk(msgspec.Struct):
    """A line of a result file: the line's answer, as its skill's route would give it."""

    line_index: int
    id: Any  # the input line's id, echoed (null when it had none)
    status: Literal["ok"]
    result: dict[str, Any]
    usage: BatchUsage


class ResultLineError(msgspec.Struct):
    """A line of a result file: the line failed (invalid_request, image_decode_failed,
    unknown_skill, processing_error)."""

    line_index: int
    id: Any
    status: Literal["error"]
    error: BatchError


SCHEMAS = [CompleteBody, UploadCreated, PartUploaded, UploadCompleted, UploadAborted, BatchJob, BatchList,
           ResultLineOk, ResultLineError]
