"""GET /openapi.json and GET /docs: the API described from the code itself.

The request bodies come straight from the msgspec Structs the front end decodes
with (api/schemas.py), so the document cannot drift from the validation.
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
from typing import Any

import falcon
import msgspec

from api import schemas
from frontend import batch_openapi, chat_openapi
from frontend.openapi_parts import (ANSWERS, REF, SECURITY, ErrorBody, Health, Live, StreamChunk, StreamEnd,
                                    StreamError, _error_responses, _json, _response, _sse_content)
from shared.config import Config

DOCS_HTML = Path(__file__).parent / "static" / "docs.html"


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
