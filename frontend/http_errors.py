"""Every error as one JSON shape: our ApiErrors (api/errors.py), Falcon's own (404, 405,
bad headers) and bugs (a plain 500).  frontend/chat.py wraps these for OpenAI's shape."""
from __future__ import annotations

import logging

import falcon

from api.errors import ApiError

log = logging.getLogger("frontend")


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


def as_http_error(ex: ApiError) -> falcon.HTTPError:
    """The API core's plain ApiError as Falcon's HTTPError (499 has no standard reason)."""
    reason = "499 Client Closed Request" if ex.status == 499 else falcon.code_to_http_status(ex.status)
    return falcon.HTTPError(reason, code=ex.code, description=ex.message, headers=ex.headers)


def handle_api_error(req, resp, ex: ApiError, params) -> None:
    handle_http_error(req, resp, as_http_error(ex), params)


def handle_unexpected(req, resp, ex: Exception, params) -> None:
    """A bug: log it with its traceback, answer a plain JSON 500."""
    log.exception("unhandled error in %s %s request_id=%s", req.method, req.path,
                  getattr(req.context, "request_id", None))
    resp.status = falcon.HTTP_500
    resp.media = _error_body(req, "internal_error", "internal server error")
