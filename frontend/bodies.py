"""Reading a request body: its media type (415), its size (413), not empty (400)."""
from __future__ import annotations

import falcon

from api.errors import ApiError
from frontend.edge import too_large_message

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
