"""The pieces of the OpenAPI document that every route's description uses: the answer
Structs (documentation only), the error statuses and the small builders (_ref, _json,
_response, streamed).  frontend/openapi.py, chat_openapi.py and batch_openapi.py build
on them; this module imports none of them."""
from __future__ import annotations

import copy
from typing import Any, Literal, Optional, Union

import msgspec
from msgspec import UNSET, UnsetType

REF = "#/components/schemas/{name}"
SECURITY = [{"apiKey": []}, {"bearer": []}]  # either header


# ---------------------------------------------------------------- answers (documentation only)
class Metrics(msgspec.Struct):
    """Timing and token counts of one text answer, as measured by the GPU worker."""

    input_tokens: Union[int, UnsetType] = UNSET
    output_tokens: Union[int, UnsetType] = UNSET
    prefill_time_ms: Union[float, UnsetType] = UNSET
    decode_time_ms: Union[float, UnsetType] = UNSET
    ttft_ms: Union[float, UnsetType] = UNSET


FinishReason = Literal["stop", "length", None]


class Grounding(msgspec.Struct):
    """Points the reasoning text refers to, for characters start_idx..end_idx of it."""

    start_idx: int
    end_idx: int
    points: list[list[float]]


class Reasoning(msgspec.Struct):
    text: str
    grounding: list[Grounding]


class CaptionResponse(msgspec.Struct):
    request_id: str
    caption: str
    metrics: Metrics
    finish_reason: FinishReason


class QueryResponse(msgspec.Struct):
    request_id: str
    answer: str
    metrics: Metrics
    finish_reason: FinishReason
    reasoning: Union[Reasoning, UnsetType] = UNSET  # only when the request asked for reasoning


class Box(msgspec.Struct):
    x_min: float
    y_min: float
    x_max: float
    y_max: float


class Point(msgspec.Struct):
    x: float
    y: float


class DetectResponse(msgspec.Struct):
    request_id: str
    objects: list[Box]


class PointResponse(msgspec.Struct):
    request_id: str
    points: list[Point]


class StreamChunk(msgspec.Struct):
    """An event of a streamed answer: the next piece of text."""

    chunk: str
    completed: Literal[False]


class StreamEnd(msgspec.Struct):
    """The last event of a streamed answer that succeeded."""

    chunk: Literal[""]
    completed: Literal[True]
    request_id: str
    metrics: Metrics
    finish_reason: FinishReason
    reasoning: Union[Reasoning, UnsetType] = UNSET


class StreamErrorDetail(msgspec.Struct):
    code: str
    message: str
    status: int


class StreamError(msgspec.Struct):
    """The last event of a streamed answer that failed after it had started."""

    error: StreamErrorDetail
    completed: Literal[True]
    request_id: str


class ErrorDetail(msgspec.Struct):
    code: str
    message: str


class ErrorBody(msgspec.Struct):
    """Every error answer."""

    error: ErrorDetail
    request_id: Optional[str]


class HealthWorkers(msgspec.Struct):
    preprocess: int
    gpu: int


class HealthQueue(msgspec.Struct):
    queued: int
    in_flight: int


class HealthBatch(msgspec.Struct):
    jobs_running: int  # bulk jobs chunking or processing (the Batch API)


class HealthModel(msgspec.Struct):
    """The configured model, plus what the GPU worker reports (device, dtype, ...)."""

    name: str
    revision: str


class Health(msgspec.Struct):
    status: Literal["ok", "loading", "unavailable"]
    ready: bool
    model: HealthModel
    auth_required: bool
    deployment: str  # a digest of DEPLOYMENT_ID: which deployment answers
    authentication: Literal["api key", "no authentication"]
    workers: HealthWorkers
    queue: Union[HealthQueue, UnsetType] = UNSET  # absent when the broker does not answer
    reason: Union[str, UnsetType] = UNSET  # why not ready (503 only)
    note: Union[str, UnsetType] = UNSET  # set for the random-weight test model
    batch: Union[HealthBatch, UnsetType] = UNSET


class Live(msgspec.Struct):
    status: Literal["alive"]


# The answer Struct of each /v1 route, and whether it can stream.
ANSWERS: dict[str, tuple[type[msgspec.Struct], bool]] = {
    "caption": (CaptionResponse, True),
    "query": (QueryResponse, True),
    "detect": (DetectResponse, False),
    "point": (PointResponse, False),
}

# The statuses a /v1 route answers besides 200 (401 only with an API key).
ERRORS = {
    400: "Malformed: not JSON, a missing field, a wrong type, a bad data URL or an unreadable image.",
    401: "Missing or wrong API key (X-Moondream-Auth or Authorization: Bearer).",
    403: "image_url is a remote URL whose address is not public (only with ALLOW_REMOTE_IMAGES).",
    404: "`model` names no model served here, or the variant asked for is not available.",
    413: "The body or the image is too large.",
    415: "The body is not JSON, or the image format is not supported.",
    422: "Well-formed but invalid values (unknown length, max_tokens above the limit, ...).",
    429: "The queue is full; retry after Retry-After seconds.",
    500: "A bug or a failed generation.",
    503: "No GPU or preprocess worker, or the broker is unavailable; retry after Retry-After seconds.",
    504: "The request took longer than REQUEST_TIMEOUT.",
    501: "The skill needs another model (Moondream 3): retrying will not help.",
}


def _ref(name: str) -> dict:
    return {"$ref": REF.format(name=name)}


def _json(name: str) -> dict:
    return {"application/json": {"schema": _ref(name)}}


REQUEST_ID_HEADER = {"X-Request-ID": {
    "description": "The request's id: the client's X-Request-ID when it sent a sane one, else a new one.",
    "schema": {"type": "string"},
}}


def _response(description: str, content: Optional[dict] = None, **extra) -> dict:
    response: dict[str, Any] = {"description": description, "headers": copy.deepcopy(REQUEST_ID_HEADER)}
    if content is not None:
        response["content"] = content
    response.update(extra)
    return response


def _error_responses(statuses) -> dict:
    return {str(status): _response(ERRORS[status], _json("ErrorBody")) for status in statuses}


def streamed(item_schema: dict, what: str) -> dict:
    """A streamed body's media-type object in OpenAPI 3.1: `schema` describes one item (the usual
    reading for text/event-stream, and what schemathesis checks each event against)."""
    return {"schema": {**item_schema, "description": f"one of the {what} (each item of the stream)"}}


def _sse_content() -> dict:
    """text/event-stream: each event's `data` is one JSON object."""
    return {"text/event-stream": streamed({
            "type": "object",
            "required": ["data"],
            "properties": {"data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"oneOf": [_ref("StreamChunk"), _ref("StreamEnd"), _ref("StreamError")]},
            }},
        }, "server-sent events")}
