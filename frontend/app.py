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

import base64
import binascii
import hmac
import json
import logging
import re
import time
import uuid
from itertools import chain
from pathlib import Path
from typing import Callable, Iterator, Optional

import falcon
import msgspec
import pybase64

from frontend import forms, metrics, models, openapi, schemas
from frontend import remote_image
from frontend.edge import RefuseWhenBusy, too_large_message
from shared import protocol
from shared.config import Config

log = logging.getLogger("frontend")

STATIC_DIR = Path(__file__).parent / "static"

# A client-chosen X-Request-ID ends up in logs and headers: keep it boring.
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# The metrics the API promises; Result.metrics may carry more (internal ones).
METRIC_KEYS = ("input_tokens", "output_tokens", "prefill_time_ms", "decode_time_ms", "ttft_ms")
TEXT_SKILLS = ("caption", "query")

TEST_MODEL_NOTE = "random-weight test model: answers are gibberish"

# How often a waiting request looks whether its HTTP client has gone away.
DISCONNECT_POLL_S = 0.5
# The broker answers 504 itself at the deadline; this only covers a broker that
# never answers at all.
DEADLINE_GRACE_S = 2.0


class ApiError(falcon.HTTPError):
    """An error with our JSON body: status, a short machine-readable code, a message."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[dict] = None):
        reason = "499 Client Closed Request" if status == 499 else falcon.code_to_http_status(status)
        super().__init__(reason, code=code, description=message, headers=headers)


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


# ---------------------------------------------------------------- error handlers
def _error_body(req: falcon.Request, code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message},
            "request_id": getattr(req.context, "request_id", None)}


def handle_http_error(req, resp, ex: falcon.HTTPError, params) -> None:
    """Our ApiErrors and Falcon's own (404, 405, bad headers) in one JSON shape."""
    resp.status = ex.status
    if ex.headers:
        resp.set_headers(ex.headers)  # e.g. Allow on a 405
    reason = ex.title.split(" ", 1)[-1]  # Falcon's titles read "404 Not Found"
    code = ex.code or reason.lower().replace(" ", "_")
    resp.media = _error_body(req, code, ex.description or reason)


def handle_unexpected(req, resp, ex: Exception, params) -> None:
    """A bug: log it with its traceback, answer a plain JSON 500."""
    log.exception("unhandled error in %s %s request_id=%s", req.method, req.path,
                  getattr(req.context, "request_id", None))
    resp.status = falcon.HTTP_500
    resp.media = _error_body(req, "internal_error", "internal server error")


# ---------------------------------------------------------------- request helpers
JSON_ONLY = "the request body must be JSON (Content-Type: application/json)"
JSON_OR_FORM = ("the request body must be JSON (Content-Type: application/json) or a form "
                "(multipart/form-data with an `image` file part, or application/x-www-form-urlencoded)")


def read_json_body(req: falcon.Request, limit: int, wrong_type: str = JSON_ONLY) -> bytes:
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", wrong_type)
    return read_body(req, limit)


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (413 above), not empty (400)."""
    too_large = ApiError(413, "payload_too_large", too_large_message(limit))
    if req.content_length is not None and req.content_length > limit:
        raise too_large
    # Read one byte past the limit to learn whether the body (chunked, say) is too big.
    body = req.bounded_stream.read(limit + 1)
    if len(body) > limit:
        raise too_large
    if not body:
        raise ApiError(400, "invalid_json", "the request body is empty")
    return body


def top_level_fields(body: bytes) -> list[str]:
    """The names of a JSON object's fields (values skipped, not decoded); [] if it is not one."""
    try:
        return list(msgspec.json.decode(body, type=dict[str, msgspec.Raw]))
    except (msgspec.DecodeError, RecursionError):
        return []


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


def parse_request(body: bytes, schema: type[msgspec.Struct]) -> msgspec.Struct:
    try:
        return schemas.decode_body(body, schema)
    except msgspec.ValidationError as ex:  # before DecodeError: it is a subclass
        raise ApiError(400, "invalid_request", str(ex)) from None
    except msgspec.DecodeError as ex:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {ex}") from None
    except RecursionError:  # msgspec skips unknown fields recursively: {"a":{"a":...}} 2000 deep
        raise ApiError(400, "invalid_json", "the request body is nested too deeply") from None


def decode_base64(data: str) -> bytes:
    """base64.b64decode(data, validate=True), the same bytes and the same errors, ~40x faster:
    pybase64's SIMD decoder where it accepts the input.  It is stricter than the standard library
    in one way only (padding followed by more `=`, which b64decode ignores), so whatever it
    refuses gets the standard library's own verdict."""
    try:
        return pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return base64.b64decode(data, validate=True)


def decode_image_url(url: str, fetch_remote: Optional[Callable[[str], bytes]] = None) -> bytes:
    """data:image/...;base64,<data> -> the encoded image bytes (still JPEG/PNG/...).
    An http(s) URL is fetched with `fetch_remote` (remote_image.py) when remote
    images are allowed (ALLOW_REMOTE_IMAGES), and refused otherwise.

    The bytes are decoded into pixels by a preprocess worker, which answers
    400/413/415/422 for images it cannot or will not read."""
    scheme = url.split(":", 1)[0].strip().lower()
    if scheme in ("http", "https"):
        if fetch_remote is None:
            raise ApiError(400, "remote_image_disabled",
                           "remote image URLs are disabled: send the image as a base64 data URL")
        try:
            return fetch_remote(url.strip())
        except remote_image.RemoteImageError as ex:
            raise ApiError(ex.status, ex.code, ex.message) from None
    if scheme != "data":
        raise ApiError(400, "invalid_image_url", "image_url must be a data:image/...;base64, URL")
    header, comma, data = url.partition(",")
    mime_type, *params = header[len("data:"):].split(";")
    if not comma or "base64" not in (p.strip().lower() for p in params):
        raise ApiError(400, "invalid_image_url", "image_url must be a data:image/...;base64, URL")
    if not mime_type.strip().lower().startswith("image/"):
        raise ApiError(415, "unsupported_media_type", f"image_url holds {mime_type or 'no media type'}, not an image")
    try:
        image = decode_base64(data)
    except (binascii.Error, ValueError):
        try:  # base64 tools often wrap lines; whitespace is harmless
            image = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_base64", "image_url does not hold valid base64 data") from None
    if not image:
        raise ApiError(400, "invalid_image", "the image is empty")
    return image


def requested_variant(names: models.ModelNames, request: msgspec.Struct) -> Optional[str]:
    """The variant a /v1 request asks for (settings.variant, variant or model), or None."""
    settings = getattr(request, "settings", None)
    try:
        return models.choose_variant(names, getattr(request, "model", None), getattr(request, "variant", None),
                                     settings.variant if settings is not None else None)
    except models.ModelNotFound as ex:
        raise ApiError(404, "model_not_found", str(ex)) from None
    except models.BadVariantId as ex:
        raise ApiError(400, "invalid_variant_id", str(ex)) from None
    except models.ConflictingVariants as ex:
        raise ApiError(422, "conflicting_variants", str(ex)) from None


def broker_error(event: protocol.Error) -> ApiError:
    headers = {"Retry-After": "1"} if event.status in (429, 503) else None
    return ApiError(event.status, event.code, event.message, headers)


def wait_events(stream, deadline: float, client_gone: Optional[Callable[[], bool]]) -> Iterator:
    """Yield a request's events up to and including its Result or Error.

    Every DISCONNECT_POLL_S it looks whether the HTTP client hung up (waitress
    tells us through `client_gone`) and if so cancels the work and ends with an
    Error 499.  It looks on a clock, not only when the broker is quiet, because
    text chunks can keep arriving for a request that is not streamed.  A
    broker silent past the deadline ends it with an Error 504."""
    next_look = time.monotonic() + DISCONNECT_POLL_S
    while True:
        remaining = deadline + DEADLINE_GRACE_S - time.time()
        if remaining <= 0:
            stream.cancel()
            yield protocol.Error(request_id=stream.request_id, status=504, code="timeout",
                                 message="the request took longer than the server allows")
            return
        try:
            event = stream.next_event(timeout=min(DISCONNECT_POLL_S, remaining))
        except TimeoutError:
            pass
        else:
            yield event
            if isinstance(event, (protocol.Result, protocol.Error)):
                return
        if client_gone is not None and time.monotonic() >= next_look:
            next_look = time.monotonic() + DISCONNECT_POLL_S
            if client_gone():
                stream.cancel()
                yield protocol.Error(request_id=stream.request_id, status=499,
                                     code="client_disconnected", message="the client went away")
                return


def result_extras(result: protocol.Result) -> dict:
    """What a caption or query answer carries besides its text."""
    extras = {"metrics": {k: result.metrics[k] for k in METRIC_KEYS if k in result.metrics},
              "finish_reason": result.finish_reason}
    if result.output.get("reasoning") is not None:
        extras["reasoning"] = result.output["reasoning"]
    return extras


def result_body(request_id: str, skill: str, result: protocol.Result) -> dict:
    body = {"request_id": request_id, **result.output}
    if skill in TEXT_SKILLS:
        body.pop("reasoning", None)  # put back by result_extras unless it is None
        body.update(result_extras(result))
    return body


# ---------------------------------------------------------------- server-sent events
def sse(data: dict) -> bytes:
    # msgspec escapes newlines inside strings, so one event is one data line.
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


class EventStreamBody:
    """The WSGI body of a streamed reply: one SSE event per Chunk, then a final
    event for the Result or Error.

    close() is called by the server when the response ends, finished or not; if
    the request had not finished (client gone, write failed) it is cancelled so
    the GPU stops working for nobody.  A class rather than a generator because
    a generator closed before its first step never runs its `finally` block."""

    def __init__(self, events: Iterator, stream, request_id: str):
        self._events = events
        self._stream = stream
        self._request_id = request_id
        self._finished = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        if self._finished:
            raise StopIteration
        event = next(self._events)
        if not isinstance(event, protocol.Chunk):
            self._finished = True
            if isinstance(event, protocol.Error) and event.status == 499:  # the client went away: nobody to tell
                raise StopIteration
        return self.render(event)

    def render(self, event) -> bytes:
        """The bytes sent for one event (subclasses speak other dialects: frontend/chat.py)."""
        if isinstance(event, protocol.Chunk):
            return sse({"chunk": event.text, "completed": False})
        if isinstance(event, protocol.Result):
            return sse({"chunk": "", "completed": True, "request_id": self._request_id,
                        **result_extras(event)})
        return sse({"error": {"code": event.code, "message": event.message, "status": event.status},
                    "completed": True, "request_id": self._request_id})

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._stream.cancel()


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
        if variant is not None:
            settings["variant"] = variant  # travels to the GPU worker like the reference's field
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
                                              settings, image, streaming, self._names.submit_model(model_id))
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


def start_request(client, config: Config, req: falcon.Request, skill: str, params: dict, settings: dict,
                  image: Optional[bytes], streaming: bool, model: str = "") -> tuple:
    """Submit a validated request to the broker -> (first event, the events after it, its stream).

    Non-streaming: the first event is the final Result.  Streaming: it is the
    first event of any kind, awaited before committing to 200, so that an error
    that comes before any text (bad image, queue full) gets its real status:
    an Error raises its ApiError here."""
    deadline = time.time() + config.request_timeout
    submit = protocol.Submit(
        request_id=routing_id(req),
        skill=skill,
        params=params,
        settings=settings,
        stream=streaming,
        has_image=image is not None,
        deadline=deadline,
        model=model,  # which served model's GPU workers take it ("": the only one)
    )
    stream = client.submit(submit, image)
    events = wait_events(stream, deadline, req.env.get("waitress.client_disconnected"))
    try:
        first = next(event for event in events if streaming or not isinstance(event, protocol.Chunk))
    except BaseException:
        stream.cancel()  # a bug or shutdown: don't leave the work running
        raise
    if isinstance(first, protocol.Error):
        raise broker_error(first)
    return first, events, stream


def send_event_stream(resp: falcon.Response, body) -> None:
    resp.content_type = "text/event-stream"
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")  # tell reverse proxies not to buffer
    resp.stream = body


def routing_id(req: falcon.Request) -> str:
    """The id the broker routes replies by.  It must be unique, and a
    client-chosen X-Request-ID need not be, so that one gets a suffix; it
    still starts with the client's id, so logs can be matched up."""
    if req.context.client_request_id:
        return f"{req.context.request_id}.{uuid.uuid4().hex[:12]}"
    return req.context.request_id


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
    from frontend import batch_api  # imported here: it uses this module's ApiError
    if client is None:
        from frontend.broker_client import BrokerClient  # imported late: it starts a thread
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
    from frontend import chat  # imported late: it builds on this module
    chat.register(app, config, client)  # /v1/chat/completions, /v1/models, skills Moondream 2 lacks
    return app
