"""GET /openapi.json and GET /docs: the API described from the code itself.

The request bodies come straight from the msgspec Structs the front end decodes
with (frontend/schemas.py), so the document cannot drift from the validation.
The answers are not decoded anywhere, so their shapes are written down here as
Structs too, next to the code that builds them (frontend/app.py); the tests
(tests/test_openapi.py) check the live service against this document.

The document is OpenAPI 3.1.0, which common generators read (3.2 is still new
to them).  3.1 has no `itemSchema` for the items of a stream
(`text/event-stream` events, `application/jsonl` lines): there the `schema`
describes one item, as is usual for event streams (see `streamed`).  Limits
that depend on the configuration (longest question, largest max_tokens) are
filled in from the running Config, so the document describes this server.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional, Union

import falcon
import msgspec
from msgspec import UNSET, UnsetType

from frontend import batch_openapi, chat_openapi, schemas
from shared.config import Config

DOCS_HTML = Path(__file__).parent / "static" / "docs.html"
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


# ---------------------------------------------------------------- the document
def _components() -> dict:
    request_schemas = [schema for _, schema in schemas.ROUTES.values()]
    answer_schemas = [schema for schema, _ in ANSWERS.values()]
    _, components = msgspec.json.schema_components(
        [*request_schemas, *answer_schemas, StreamChunk, StreamEnd, StreamError, ErrorBody, Health, Live,
         *chat_openapi.SCHEMAS, *batch_openapi.SCHEMAS],
        ref_template=REF,
    )
    return components


def _apply_limits(components: dict, config: Config) -> None:
    """Write the configured limits into the request schemas (schemas.py leaves
    them to check(), which answers 422 above them)."""
    settings = components["Settings"]["properties"]
    settings["max_tokens"]["maximum"] = config.max_tokens_limit
    settings["max_objects"]["maximum"] = config.max_objects_limit
    for name, field in (("QueryRequest", "question"), ("DetectRequest", "object"), ("PointRequest", "object")):
        components[name]["properties"][field]["maxLength"] = config.max_text_chars
    chat_openapi.apply_limits(components, config)


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


SKILL_SUMMARIES = {
    "caption": "Describe the image.",
    "query": "Answer a question about the image (or without one).",
    "detect": "Bounding boxes of every instance of an object.",
    "point": "Center points of every instance of an object.",
}


def _skill_operation(path: str, skill: str, schema: type, config: Config) -> dict:
    auth = bool(config.api_key)
    answer, streams = ANSWERS[skill]
    content = _json(answer.__name__)
    description = f"Runs Moondream's {skill} skill on the image."
    if streams:
        content.update(_sse_content())
        description += (' With "stream": true the answer is server-sent events: StreamChunk events, then one'
                        " StreamEnd (or StreamError when it fails after it started).")
    # Forms are described in words only: the JSON schema is the contract, a form carries the same fields.
    description += (" The same fields may come as a form: multipart/form-data with the image as a file part"
                    " named `image` (or an `image_url` field), or application/x-www-form-urlencoded;"
                    " `settings` and `spatial_refs` hold JSON text. Unknown top-level fields are ignored and"
                    " named in the X-Ignored-Fields header (a 422 when the server runs with STRICT_FIELDS=1).")
    statuses = [400, *([401] if auth else []), *([403] if config.allow_remote_images else []),
                404, 413, 415, 422, 429, 500, 503, 504]
    operation = {
        "operationId": skill,
        "summary": SKILL_SUMMARIES.get(skill, skill),  # not the path: /docs shows it beside the path
        "description": description,
        "tags": ["skills"],
        "parameters": [{
            "name": "X-Request-ID", "in": "header", "required": False,
            "description": "Your id for the request (letters, digits and ._:-, at most 128), echoed back.",
            "schema": {"type": "string"},
        }],
        "requestBody": {"required": True, "content": _json(schema.__name__)},
        "responses": {"200": _response("The answer.", content), **_error_responses(statuses)},
    }
    if auth:
        operation["security"] = SECURITY
    return operation


def _get(operation_id: str, summary: str, responses: dict, tag: str = "service") -> dict:
    return {"get": {"operationId": operation_id, "summary": summary, "tags": [tag], "responses": responses}}


def build_spec(config: Config) -> dict:
    """The OpenAPI document of a front end running with `config`."""
    components = _components()
    _apply_limits(components, config)
    auth = bool(config.api_key)
    paths: dict[str, dict] = {
        path: {"post": _skill_operation(path, skill, schema, config)}
        for path, (skill, schema) in schemas.ROUTES.items()
    }
    health = _response("Ready (200) or not yet (503): model, workers, queue.", _json("Health"))
    paths["/health"] = _get("health", "Readiness: 200 once a GPU worker is ready, 503 until then.",
                            {"200": health, "503": copy.deepcopy(health)})
    paths["/health/live"] = _get("live", "Liveness: 200 while the front end runs.",
                                 {"200": _response("Alive.", _json("Live"))})
    text = {"schema": {"type": "string"}}
    paths["/metrics"] = _get("metrics", "Prometheus metrics (text exposition format).",
                             {"200": _response("Metrics.", {"text/plain": text})})
    paths["/openapi.json"] = _get("openapi", "This document.",
                                  {"200": _response("OpenAPI document.", {"application/json": {"schema": {"type": "object"}}})},
                                  tag="documentation")
    paths["/docs"] = _get("docs", "A page that renders this document.",
                          {"200": _response("HTML page.", {"text/html": text})}, tag="documentation")
    paths["/"] = _get("index", "A page to try the model.",
                      {"200": _response("HTML page.", {"text/html": text})}, tag="documentation")
    paths.update(chat_openapi.paths(config))
    paths.update(batch_openapi.paths(config))

    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Moondream 2 serving API",
            "version": "1",
            "description": ("Moondream's REST API. Images are base64 data URLs. Every error is JSON: "
                            '{"error": {"code", "message"}, "request_id"}.'),
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth:  # the same key, in either header
        spec["components"]["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-Moondream-Auth"},
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <VLM_API_KEY>"}}
    return spec


# ---------------------------------------------------------------- resources
class SpecResource:
    """GET /openapi.json"""

    def __init__(self, config: Config):
        # Built once: the configuration does not change while the process runs.
        self._body = msgspec.json.encode(build_spec(config))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body


class DocsResource:
    """GET /docs: a self-contained page (no CDN) that renders /openapi.json in the browser."""

    def __init__(self):
        self._html = DOCS_HTML.read_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.data = self._html
