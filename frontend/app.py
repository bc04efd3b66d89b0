"""The HTTP front end: a Falcon WSGI app that speaks Moondream's cloud API.

Each /v1 request is validated here (auth, content type, size, JSON shape,
values), turned into a `protocol.Submit` and handed to the broker through a
`BrokerClient`; the replies come back as a `ReplyStream` of Chunk events ending
in one Result or Error.  The app answers either one JSON body or, with
`"stream": true`, server-sent events.

Every error is JSON: ``{"error": {"code", "message"}, "request_id"}``.

Routes:
    POST /v1/caption, /v1/query, /v1/detect, /v1/point
    POST /v1/chat/completions, GET /v1/models   OpenAI's protocol (chat.py)
    GET  /health       readiness, model and worker counts (503 until a GPU worker is ready)
    GET  /health/live  the process is alive (always 200)
    GET  /             a page to try the model (static/index.html)
    GET  /openapi.json, /docs   the API description and a page rendering it (openapi.py)
    GET  /metrics      Prometheus metrics (metrics.py)
    /v1/batch...       the Batch API: bulk jobs from a JSONL file (batch_api.py)
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from itertools import chain
from pathlib import Path
from typing import Optional

import falcon
import msgspec

from api import models, remote_image, schemas
from api.errors import ApiError
from api.images import decode_image_url
from api.parsing import parse_request, requested_variant, top_level_fields
from frontend import batch_api, chat, forms, metrics, openapi
from frontend.bodies import JSON_OR_FORM, read_body, read_json_body
from frontend.edge import RefuseWhenBusy
from frontend.http_errors import handle_api_error, handle_http_error, handle_unexpected
from frontend.streams import TEXT_SKILLS, EventStreamBody, result_body, send_event_stream, start_request
from shared import protocol
from shared.config import Config

log = logging.getLogger("frontend")

STATIC_DIR = Path(__file__).parent / "static"

# A client-chosen X-Request-ID ends up in logs and headers: keep it boring.
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

TEST_MODEL_NOTE = "random-weight test model: answers are gibberish"


# ---------------------------------------------------------------- middleware
class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID if sane), echoes it
    in the response, and writes one access-log line."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        given = req.get_header("X-Request-ID")
        req.context.client_request_id = bool(given and SAFE_REQUEST_ID.fullmatch(given))
        req.context.request_id = given if req.context.client_request_id else uuid.uuid4().hex
        req.context.started = time.monotonic()

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        resp.set_header("X-Request-ID", req.context.request_id)
        # For a stream this is the time to its first event, not to its end.
        elapsed_ms = round((time.monotonic() - req.context.started) * 1000, 1)
        # Health checks come every few seconds from probes and the page: keep them out of INFO.
        level = logging.DEBUG if req.path.startswith("/health") else logging.INFO
        log.log(level, "%s %s %s", req.method, req.path, resp.status_code,
                extra={"request_id": req.context.request_id, "http_status": resp.status_code,
                       "duration_ms": elapsed_ms})


class AuthMiddleware:
    """When an API key is configured, /v1 routes need it, in X-Moondream-Auth (Moondream's
    clients) or as `Authorization: Bearer <key>` (OpenAI's SDKs, the Python client's chat())."""

    def __init__(self, api_key: str):
        self._key = api_key.encode()

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._key or not (req.path == "/v1" or req.path.startswith("/v1/")):
            return
        scheme, _, bearer = (req.get_header("Authorization") or "").strip().partition(" ")
        bearer = bearer.strip() if scheme.lower() == "bearer" else ""
        # compare_digest: the time taken must not tell how much of the key matched.
        # Both are compared always (no early exit), so timing says nothing about which header held it.
        moondream_ok = hmac.compare_digest((req.get_header("X-Moondream-Auth") or "").encode(), self._key)
        bearer_ok = hmac.compare_digest(bearer.encode(), self._key)
        if not (moondream_ok | bearer_ok):
            raise ApiError(401, "unauthorized",
                           "missing or invalid API key: send X-Moondream-Auth or Authorization: Bearer")


# ---------------------------------------------------------------- request helpers
def name_unknown_fields(req: falcon.Request, resp: falcon.Response, given, schema: type[msgspec.Struct],
                        strict: bool) -> None:
    """Fields the route does not know: 422 with STRICT_FIELDS, else ignored but named
    (X-Ignored-Fields and a log line), so that a misspelt `lenght` does not pass unseen."""
    # json.dumps: a name may hold anything (controls, lone surrogates); headers and logs get it escaped
    unknown = [json.dumps(name)[1:-1] for name in given if name not in schema.__struct_fields__]
    if not unknown:
        return
    names = ", ".join(unknown)
    if strict:
        raise ApiError(422, "unknown_field", f"unknown field{'s' if len(unknown) > 1 else ''} {names} "
                       f"(the server runs with STRICT_FIELDS=1)")
    resp.set_header("X-Ignored-Fields", names[:512])
    log.info("ignored unknown fields in %s: %s", req.path, names[:512],
             extra={"request_id": req.context.request_id})


# ---------------------------------------------------------------- resources
class SkillResource:
    """POST /v1/<skill>: validate, submit to the broker, answer JSON or SSE."""

    def __init__(self, skill: str, schema: type[msgspec.Struct], config: Config, client):
        self._skill = skill
        self._schema = schema
        self._config = config
        self._client = client
        self._fetch_remote = remote_image.fetcher(config)  # None unless ALLOW_REMOTE_IMAGES
        self._names = models.ModelNames(config)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        image_part = None
        if forms.is_form(req.content_type):  # Moondream Station's way: curl -F image=@photo.jpg -F question=...
            request, given, image_part = self.parse_form(req)
        else:
            body = read_json_body(req, self._config.max_body_bytes, JSON_OR_FORM)
            request, given = parse_request(body, self._schema), top_level_fields(body)
        name_unknown_fields(req, resp, given, self._schema, self._config.strict_fields)
        variant = requested_variant(self._names, request)
        try:
            params, settings = request.check(self._config)
        except schemas.InvalidValue as ex:
            raise ApiError(422, "invalid_value", str(ex)) from None
        model_id = self._names.resolve(getattr(request, "model", None))[0]  # checked by requested_variant
        req.context.model_id = self._names.model_id(variant, model_id)  # for /metrics
        image_url = getattr(request, "image_url", None)
        if image_part is not None:
            if not image_part:
                raise ApiError(400, "invalid_image", "the image is empty")
            image = image_part
        else:
            image = decode_image_url(image_url, self._fetch_remote) if image_url is not None else None
        streaming = bool(getattr(request, "stream", False)) and self._skill in TEXT_SKILLS

        first, events, stream = start_request(self._client, self._config, req, self._skill, params,
                                              settings, image, streaming, self._names.submit_model(model_id),
                                              variant=variant)
        if not streaming:
            resp.media = result_body(req.context.request_id, self._skill, first)
            return
        send_event_stream(resp, EventStreamBody(chain([first], events), stream, req.context.request_id))

    def parse_form(self, req: falcon.Request) -> tuple[msgspec.Struct, list[str], Optional[bytes]]:
        """A form body -> (the route's Struct, the field names given, the `image` file part's bytes)."""
        body = read_body(req, self._config.max_body_bytes)
        try:
            fields, image_part = forms.read_fields(body, req.content_type, self._config.max_body_bytes)
            raw = forms.form_to_request(fields, image_part is not None)
        except forms.FormError as ex:
            raise ApiError(400, "invalid_form", str(ex)) from None
        try:
            request = msgspec.convert(raw, type=self._schema, strict=False)  # "true", "8" as JSON's true, 8
        except msgspec.ValidationError as ex:
            raise ApiError(400, "invalid_request", str(ex)) from None
        return request, list(raw), image_part


# /health's "kv_cache": the GPU workers' KV pools (Scheduler.stats(), summed over workers)
KV_HEALTH = {"bytes_total": "kv_bytes_total", "bytes_used": "kv_bytes_used", "bytes_shared": "kv_bytes_shared",
             "blocks_total": "kv_blocks_total", "blocks_free": "kv_blocks_free",
             "running_sequences": "running", "waiting_sequences": "waiting", "waiting_for_blocks": "waiting_for_blocks"}


class HealthResource:
    """GET /health: is a GPU worker ready?  200 if so, 503 otherwise."""

    def __init__(self, config: Config, client, batch_jobs=None):
        self._config = config
        self._client = client
        self._batch_jobs = batch_jobs  # shared.batch_store.BatchStore, for the jobs running

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = self._client.status(timeout=1.0)
        names = models.ModelNames(self._config)
        model = {"name": names.models[0].source, "revision": self._config.revision, "id": names.base}
        served = [{"id": m.id, "name": m.source, "family": m.family, "ready": False} for m in names.models]
        reason, kv = None, {}
        if status is None:
            state, ready, workers, queue = "unavailable", False, {"preprocess": 0, "gpu": 0}, None
            reason = getattr(self._client, "problem", None) or "the broker is not answering"
        else:
            ready = status.gpu_ready
            state = "ok" if ready else "loading"
            if not ready:
                cannot_start = status.cannot_start.get(protocol.GPU)
                reason = (f"the GPU worker cannot start: {cannot_start}" if cannot_start
                          else "no GPU worker has registered yet (its model may still be loading)")
            workers = {"preprocess": status.preprocess_workers, "gpu": status.gpu_workers}
            queue = {"queued": status.queued, "in_flight": status.in_flight}
            kv = {name: status.gpu_stats[key] for name, key in KV_HEALTH.items() if key in status.gpu_stats}
            registered = {m.get("id", ""): m for m in status.models} or {"": status.model}
            model.update(registered.get(names.base) or registered.get("") or status.model)
            model["variants"] = {"loaded": list(status.variants.get("loaded", [])),
                                 "available": list(status.variants.get("available", []))}
            for entry in served:  # every model served: its worker's Ready.model once registered
                info = registered.get(entry["id"]) or (registered.get("") if len(served) == 1 else None)
                if info:
                    entry.update({k: v for k, v in info.items() if k != "id"}, ready=True)
        body = {
            "status": state,
            "ready": ready,
            "model": model,  # the default model (the first of MOONDREAM_MODELS)
            "models": served,
            "auth_required": bool(self._config.api_key),
            # which deployment answers (a digest of DEPLOYMENT_ID): ready_notice checks it is its own
            "deployment": self._config.deployment_tag,
            "authentication": "api key" if self._config.api_key else "no authentication",
            "workers": workers,
        }
        if reason is not None:
            body["reason"] = reason
        if queue is not None:
            body["queue"] = queue
        if kv:
            body["kv_cache"] = kv
        if self._batch_jobs is not None:
            jobs = self._batch_jobs.summary()["jobs"]
            body["batch"] = {"jobs_running": jobs.get("processing", 0) + jobs.get("chunking", 0)}
        if model.get("test_model"):
            body["note"] = TEST_MODEL_NOTE
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = body


class LiveResource:
    """GET /health/live: answers while the process can serve HTTP at all."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "alive"}


class IndexResource:
    """GET /: the try-it page."""

    def __init__(self):
        self._html = (STATIC_DIR / "index.html").read_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.data = self._html


# ---------------------------------------------------------------- the app
def create_app(config: Config, client=None) -> falcon.App:
    """Build the WSGI app.  `client` is a BrokerClient (or anything with its
    submit/status API); by default one is created from `config`."""
    if client is None:
        from broker_client.client import BrokerClient  # imported late: it starts a thread
        client = BrokerClient(config)

    app_metrics = metrics.FrontendMetrics(client, config.prometheus_multiproc_dir)
    client = metrics.MeteredClient(client, app_metrics)  # times each request's events
    # MetricsMiddleware first: its process_response runs last and sees the final status.
    # RefuseWhenBusy after auth: a wrong key is a 401 even when the edge refused the request (429).
    app = falcon.App(middleware=[metrics.MetricsMiddleware(app_metrics), RequestIdMiddleware(),
                                 AuthMiddleware(config.api_key), RefuseWhenBusy()])
    # Registration order matters only for equally specific types; Falcon picks
    # the most specific handler, so HTTPErrors never reach the catch-all.
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(ApiError, handle_api_error)

    for path, (skill, schema) in schemas.ROUTES.items():
        app.add_route(path, SkillResource(skill, schema, config, client))
    batch_jobs = batch_api.add_routes(app, config)  # the Batch API (frontend/batch_api.py)
    app_metrics.scrape_registry.register(batch_api.BatchCollector(batch_jobs))  # read at scrape time
    app.add_route("/health", HealthResource(config, client, batch_jobs))
    app.add_route("/health/live", LiveResource())
    app.add_route("/", IndexResource())
    app.add_route("/openapi.json", openapi.SpecResource(config))
    app.add_route("/docs", openapi.DocsResource())
    app.add_route("/metrics", metrics.MetricsResource(app_metrics))
    app.add_static_route("/static", str(STATIC_DIR))
    chat.register(app, config, client)  # /v1/chat/completions, /v1/models, skills Moondream 2 lacks
    return app
