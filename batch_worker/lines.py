"""One input line of a batch job: checked, turned into a protocol.Submit, and
its outcome turned into one result line.

Input line (Moondream's Batch API): `id` (optional, echoed), `skill` (caption,
query, detect, point), `image` (base64, or a data URL), `length`, `question`,
`reasoning`, `spatial_refs`, `object`, `settings`, and `variant` / `model` for
a fine-tuned variant.  The checks are the /v1 routes' own (api/schemas.py),
so a line and the same request over HTTP are accepted or refused alike.

Result line: {line_index, id, status: "ok", result, usage} or
{line_index, id, status: "error", error: {code, message}} with the cloud's codes.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Optional

import msgspec

from api import models, schemas
from api.errors import ApiError
from api.images import decode_image_url
from shared import protocol

INVALID_REQUEST = "invalid_request"
IMAGE_DECODE_FAILED = "image_decode_failed"
UNKNOWN_SKILL = "unknown_skill"
PROCESSING_ERROR = "processing_error"

SKILLS = ("caption", "query", "detect", "point")
# Errors that say "not now" rather than "not this line": the line runs again.
RETRY_STATUSES = (429, 503, 504)


class LineError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class BatchLine(msgspec.Struct):
    skill: Optional[str] = None
    image: Optional[str] = None
    images: Optional[list[str]] = None
    length: str = "normal"
    question: Optional[str] = None
    reasoning: Optional[bool] = None  # None: the model's default (Moondream 3 reasons)
    spatial_refs: Optional[list[list[float]]] = None
    object: Optional[str] = None
    settings: Optional[schemas.Settings] = None
    variant: Optional[str] = None
    model: Optional[str] = None
    id: Any = None


def line_id(raw: bytes) -> Any:
    """The line's `id`, echoed in its result even when the rest of the line is wrong."""
    try:
        value = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    return value.get("id") if isinstance(value, dict) else None


def to_submit(raw: bytes, request_id: str, config, names: models.ModelNames) -> tuple[protocol.Submit, Optional[bytes]]:
    """A line -> (Submit, encoded image bytes or None).  Raises LineError for a line that cannot run."""
    try:
        line = msgspec.json.decode(raw, type=BatchLine)
    except msgspec.ValidationError as ex:
        raise LineError(INVALID_REQUEST, str(ex)) from None
    except msgspec.DecodeError as ex:  # chunking checked the JSON already; kept for safety
        raise LineError(INVALID_REQUEST, f"the line is not valid JSON: {ex}") from None
    except RecursionError:  # msgspec skips unknown fields recursively
        raise LineError(INVALID_REQUEST, "the line is nested too deeply") from None
    if line.skill is None:
        raise LineError(INVALID_REQUEST, "the line has no skill")
    if line.skill not in SKILLS:
        raise LineError(UNKNOWN_SKILL, f"unknown skill {line.skill[:50]!r}; use one of {', '.join(SKILLS)}")
    image_text = line.image
    if line.images is not None:
        if len(line.images) != 1 or image_text is not None:
            raise LineError(INVALID_REQUEST, "Moondream 2 takes one image per line")
        image_text = line.images[0]
    try:
        params, settings = _checked(line, image_text, config)
        variant = models.choose_variant(names, line.model, line.variant,
                                        line.settings.variant if line.settings else None)
        model_id = names.resolve(line.model)[0]
    except (schemas.InvalidValue, models.ModelNotFound, models.BadVariantId, models.ConflictingVariants) as ex:
        raise LineError(INVALID_REQUEST, str(ex)) from None
    image = None
    if image_text is not None:
        url = image_text if image_text.startswith("data:") else "data:image/*;base64," + image_text
        try:
            image = decode_image_url(url)
        except ApiError as ex:
            raise LineError(IMAGE_DECODE_FAILED, ex.message) from None
    submit = protocol.Submit(request_id=request_id, skill=line.skill, params=params, settings=settings,
                             has_image=image is not None, deadline=time.time() + config.request_timeout,
                             priority=protocol.BACKGROUND, model=names.submit_model(model_id), variant=variant)
    return submit, image


def _checked(line: BatchLine, image: Optional[str], config) -> tuple[protocol.SkillParams, protocol.SamplingSettings]:
    """The route schema's own checks, on the line's fields."""
    settings = line.settings
    if line.skill != "query" and image is None:
        raise schemas.InvalidValue(f"{line.skill} needs an image")
    if line.skill == "caption":
        return schemas.CaptionRequest(image_url="", length=line.length, settings=settings).check(config)
    if line.skill == "query":
        if line.question is None:
            raise schemas.InvalidValue("query needs a question")
        return schemas.QueryRequest(question=line.question, image_url=image, reasoning=line.reasoning,
                                    spatial_refs=line.spatial_refs, settings=settings).check(config)
    if line.object is None:
        raise schemas.InvalidValue(f"{line.skill} needs an object")
    route = schemas.PointRequest if line.skill == "point" else schemas.DetectRequest
    return route(image_url="", object=line.object, settings=settings).check(config)


def new_request_id(job_id: str, line_index: int) -> str:
    """Unique per attempt: a line that runs again must not collide with its earlier request."""
    return f"batch-{job_id[:12]}-{line_index}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- result lines
def ok_line(line_index: int, id_: Any, result: protocol.Result) -> tuple[bytes, int, int]:
    output = dict(result.output)
    if output.get("reasoning", 0) is None:
        output.pop("reasoning")
    if result.finish_reason is not None:
        output["finish_reason"] = result.finish_reason
    usage = {"input_tokens": int(result.metrics.get("input_tokens", 0)),
             "output_tokens": int(result.metrics.get("output_tokens", 0))}
    body = {"line_index": line_index, "id": id_, "status": "ok", "result": output, "usage": usage}
    return msgspec.json.encode(body), usage["input_tokens"], usage["output_tokens"]


def error_line(line_index: int, id_: Any, code: str, message: str) -> bytes:
    return msgspec.json.encode({"line_index": line_index, "id": id_, "status": "error",
                                "error": {"code": code, "message": message}})


def error_code(event: protocol.Error) -> str:
    """The cloud's per-line code for a pipeline error."""
    if event.status >= 500:
        return PROCESSING_ERROR
    if "image" in event.code or event.code == "preprocess_failed":
        return IMAGE_DECODE_FAILED
    return INVALID_REQUEST
