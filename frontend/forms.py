"""Form bodies on the /v1 skill routes, as Moondream Station takes them:

    curl -F image=@photo.jpg -F question="What is this?" localhost:5000/v1/query
    curl --data-urlencode question="Hi?" -d 'settings={"max_tokens": 8}' localhost:5000/v1/query

A form's fields are the JSON body's top-level fields under the same names; `settings` and
`spatial_refs` hold JSON text; `stream` and `reasoning` take true/false/1/0.  The image is
either a file part named `image` (its bytes as they are: JPEG, PNG, ...) or an `image_url`
field (a data URL, as in JSON).  Both kinds become the same dict a JSON body would decode to and
go through the same Struct and the same checks (api/schemas.py), so the errors are the
same too.  The caller reads the body within MAX_BODY_BYTES first.
"""
from __future__ import annotations

import io
import json
from typing import Optional
from urllib.parse import parse_qsl

import falcon
from falcon.media import MultipartFormHandler
from falcon.media.multipart import MultipartParseOptions

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
JSON_TEXT_FIELDS = ("settings", "spatial_refs")  # fields whose form value is JSON text
IMAGE_PART = "image"


class FormError(ValueError):
    """A form that cannot be read (HTTP 400): the message says what to fix."""


def media_type(content_type: Optional[str]) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_form(content_type: Optional[str]) -> bool:
    return media_type(content_type) in FORM_TYPES


def _multipart_handler(limit: int) -> MultipartFormHandler:
    options = MultipartParseOptions()
    options.max_body_part_buffer_size = limit  # an image part may be as large as the body allows
    options.max_body_part_count = 64
    return MultipartFormHandler(options)


def read_fields(body: bytes, content_type: str, limit: int,
                file_part: str = IMAGE_PART) -> tuple[list[tuple[str, str]], Optional[bytes]]:
    """-> ([(name, text value)], the bytes of the file part named `file_part`, or None)."""
    if media_type(content_type) == "application/x-www-form-urlencoded":
        if body.lstrip()[:1] in (b"{", b"["):  # curl -d '{...}' without -H sends this type
            raise FormError("the body is JSON but its Content-Type says a form (curl -d sends "
                            "application/x-www-form-urlencoded): send Content-Type: application/json")
        try:
            return parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body)), None
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormError(f"the form body is not valid application/x-www-form-urlencoded: {exc}") from None
    fields, image = [], None
    try:
        for part in _multipart_handler(limit).deserialize(io.BytesIO(body), content_type, len(body)):
            if part.name == file_part:  # the file part, with or without a filename
                if image is not None:
                    raise FormError(f"send one `{file_part}` part")
                image = part.get_data()
            else:
                fields.append((part.name, part.get_text()))
    except falcon.HTTPError as exc:  # falcon's multipart parser: malformed parts, a missing boundary
        raise FormError(f"the multipart/form-data body cannot be read: {exc.description or exc.title}") from None
    except UnicodeDecodeError:
        raise FormError("a multipart/form-data text field is not UTF-8") from None
    return fields, image


def form_to_request(fields: list[tuple[str, str]], has_image_part: bool) -> dict:
    """The dict a JSON body with the same fields would decode to (values still text but for the
    JSON-text fields; msgspec.convert(strict=False) turns "true" and "8" into their types)."""
    request: dict = {}
    for name, value in fields:
        if name in request:
            raise FormError(f"field `{name}` is given twice")
        if name in JSON_TEXT_FIELDS:
            try:
                request[name] = json.loads(value)
            except ValueError as exc:
                raise FormError(f"field `{name}` must hold JSON text, e.g. settings={{\"max_tokens\": 64}}: {exc}") from None
        else:
            request[name] = value
    if has_image_part:
        if "image_url" in request:
            raise FormError("send the image either as the `image` file part or as `image_url`, not both")
        request["image_url"] = ""  # stands in for the file part, which the route takes as it is
    return request
