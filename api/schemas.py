"""Request bodies of the /v1 routes: one msgspec Struct per route.

Validation happens in two steps, matching the two kinds of client mistakes:

1. Shape (HTTP 400): `decode_body()` decodes the JSON straight into the route's
   Struct.  Wrong JSON, a missing required field or a value of the wrong type
   ends here, with msgspec's message naming the field (``at `$.settings.top_p```).
2. Meaning (HTTP 422): each Struct's `check(config)` looks at the values: an
   unknown `length`, `max_tokens` above the configured limit, a question that is
   too long...  Limits come from `shared.config.Config`, so they are not baked
   into the types; the enums and ranges are still written into the Structs'
   metadata so that `msgspec.json.schema()` gives a faithful description (the
   base of an OpenAPI document).

Unknown fields are ignored, as the Moondream cloud API does (its client sends
`model`, for example).
"""
from __future__ import annotations

import math
from typing import Annotated, ClassVar, Optional

import msgspec
from msgspec import Meta

from shared.config import Config
from shared.protocol import (DEFAULT_MAX_OBJECTS, DEFAULT_MAX_TOKENS, CaptionParams, DetectParams, PointParams,
                             QueryParams, SamplingSettings, SkillParams)

# Spatial references become tokens in the prompt; a few are plenty and an
# unbounded number could overflow the model's 2048-token context.
MAX_SPATIAL_REFS = 16

CAPTION_LENGTHS = ("short", "normal", "long")


class InvalidValue(ValueError):
    """A well-formed request whose values make no sense (HTTP 422)."""


def decode_body(body: bytes, schema: type[msgspec.Struct]):
    """JSON bytes -> instance of `schema`.

    Raises msgspec.ValidationError for a wrong shape and msgspec.DecodeError for
    text that is not JSON (ValidationError is a subclass: catch it first).
    """
    return msgspec.json.decode(body, type=schema)


# ---------------------------------------------------------------- shared pieces
ImageUrl = Annotated[
    str,
    Meta(description="The image as a base64 data URL: data:image/jpeg;base64,... "
         "http(s) URLs only where the server enables ALLOW_REMOTE_IMAGES (public addresses only)."),
]

Model = Annotated[
    Optional[str],
    Meta(description="The model to answer: MODEL_NAME (default \"moondream2\") or one of its aliases, "
         "or \"<model name>/<variant id>\" for a fine-tuned variant. Anything else is a 404."),
]

Variant = Annotated[
    Optional[str],
    Meta(description="A fine-tuned variant (LoRA adapter) of the model, e.g. \"ft-alpha@100\"; "
         "absent: the base model.", extra_json_schema={"maxLength": 128}),
]

# extra_json_schema only documents; the ranges are checked by check() (422, not 400).
Coordinate = Annotated[float, Meta(extra_json_schema={"minimum": 0, "maximum": 1})]

SpatialRef = Annotated[
    list[Coordinate],
    Meta(description="A point [x, y] or a box [x_min, y_min, x_max, y_max], "
         "coordinates normalised to 0..1.",
         extra_json_schema={"minItems": 2, "maxItems": 4}),
]




class Settings(msgspec.Struct):
    """Sampling settings; a field left out takes the model's default."""

    temperature: Annotated[
        Optional[float],
        Meta(description="Sampling temperature, >= 0; 0 is greedy. Default 0.5.",
             extra_json_schema={"minimum": 0}),
    ] = None
    top_p: Annotated[
        Optional[float],
        Meta(description="Nucleus sampling mass in (0, 1]; 0 is greedy. Default 0.3.",
             extra_json_schema={"minimum": 0, "maximum": 1}),
    ] = None
    max_tokens: Annotated[
        Optional[int],
        Meta(description=f"Most tokens to generate, 1..MAX_TOKENS_LIMIT. Default {DEFAULT_MAX_TOKENS}.",
             extra_json_schema={"minimum": 1}),
    ] = None
    max_objects: Annotated[
        Optional[int],
        Meta(description="Most objects or points to return (detect, point), "
             f"1..MAX_OBJECTS_LIMIT. Default {DEFAULT_MAX_OBJECTS}.",
             extra_json_schema={"minimum": 1}),
    ] = None
    variant: Variant = None

    def check(self, config: Config) -> SamplingSettings:
        """Validate; return the settings for Submit: those the client gave (the engine fills in
        the rest).  The variant is not among them: the route chooses it (api/models.py)."""
        given = {name: getattr(self, name) for name in self.__struct_fields__
                 if getattr(self, name) is not None and name != "variant"}
        for name in ("temperature", "top_p"):
            if name in given and not math.isfinite(given[name]):
                raise InvalidValue(f"settings.{name} must be a finite number")
        if given.get("temperature", 0) < 0:
            raise InvalidValue("settings.temperature must be >= 0")
        if not 0 <= given.get("top_p", 1) <= 1:
            raise InvalidValue("settings.top_p must be in (0, 1], or 0 for greedy decoding")
        if not 1 <= given.get("max_tokens", 1) <= config.max_tokens_limit:
            raise InvalidValue(f"settings.max_tokens must be between 1 and {config.max_tokens_limit}")
        if not 1 <= given.get("max_objects", 1) <= config.max_objects_limit:
            raise InvalidValue(f"settings.max_objects must be between 1 and {config.max_objects_limit}")
        # the engine's defaults (DEFAULT_MAX_TOKENS, DEFAULT_MAX_OBJECTS) must respect this server's limits too
        if "max_tokens" not in given and config.max_tokens_limit < DEFAULT_MAX_TOKENS:
            given["max_tokens"] = config.max_tokens_limit
        if "max_objects" not in given and config.max_objects_limit < DEFAULT_MAX_OBJECTS:
            given["max_objects"] = config.max_objects_limit
        return SamplingSettings(**given)


def _check_text(name: str, value: str, config: Config) -> None:
    if not value.strip():
        raise InvalidValue(f"{name} must not be empty")
    if len(value) > config.max_text_chars:
        raise InvalidValue(f"{name} is longer than {config.max_text_chars} characters")


def _check_spatial_refs(refs: list[list[float]]) -> None:
    if len(refs) > MAX_SPATIAL_REFS:
        raise InvalidValue(f"spatial_refs holds more than {MAX_SPATIAL_REFS} entries")
    for i, ref in enumerate(refs):
        if len(ref) not in (2, 4):
            raise InvalidValue(f"spatial_refs[{i}] must be [x, y] or [x_min, y_min, x_max, y_max]")
        if not all(0 <= v <= 1 for v in ref):  # also false for NaN
            raise InvalidValue(f"spatial_refs[{i}] coordinates must be between 0 and 1")
        if len(ref) == 4 and (ref[0] > ref[2] or ref[1] > ref[3]):
            raise InvalidValue(f"spatial_refs[{i}] must have x_min <= x_max and y_min <= y_max")


# ---------------------------------------------------------------- one Struct per route
class CaptionRequest(msgspec.Struct):
    """POST /v1/caption"""

    image_url: ImageUrl
    length: Annotated[
        str,
        Meta(description="Caption length.", extra_json_schema={"enum": list(CAPTION_LENGTHS)}),
    ] = "normal"
    stream: Annotated[bool, Meta(description="Answer with server-sent events as text is generated.")] = False
    settings: Optional[Settings] = None
    model: Model = None
    variant: Variant = None

    def check(self, config: Config) -> tuple[SkillParams, SamplingSettings]:
        """-> (params, settings) for protocol.Submit."""
        if self.length not in CAPTION_LENGTHS:
            raise InvalidValue(f"length must be one of {', '.join(CAPTION_LENGTHS)}")
        return CaptionParams(length=self.length), (self.settings or Settings()).check(config)


class QueryRequest(msgspec.Struct):
    """POST /v1/query"""

    question: Annotated[str, Meta(description="The question to answer.")]
    image_url: Annotated[
        Optional[str],
        Meta(description="Optional image as a base64 data URL; without it the model answers from text alone."),
    ] = None
    stream: Annotated[bool, Meta(description="Answer with server-sent events as text is generated.")] = False
    reasoning: Annotated[Optional[bool], Meta(
        description="Let the model reason (grounded in the image) before answering. Left out: the model's "
                    "default (Moondream 2: false; Moondream 3: true, as in Moondream's cloud).")] = None
    spatial_refs: Annotated[
        Optional[list[SpatialRef]],
        Meta(description="Image regions the question refers to (needs an image).",
             extra_json_schema={"maxItems": MAX_SPATIAL_REFS}),
    ] = None
    settings: Optional[Settings] = None
    model: Model = None
    variant: Variant = None

    def check(self, config: Config) -> tuple[SkillParams, SamplingSettings]:
        _check_text("question", self.question, config)
        refs = self.spatial_refs or []
        if refs and self.image_url is None:
            raise InvalidValue("spatial_refs need an image: send image_url too")
        _check_spatial_refs(refs)
        params = QueryParams(question=self.question, reasoning=self.reasoning, spatial_refs=refs)
        return params, (self.settings or Settings()).check(config)


class DetectRequest(msgspec.Struct):
    """POST /v1/detect"""

    image_url: ImageUrl
    object: Annotated[str, Meta(description="What to find, e.g. \"face\".")]
    settings: Optional[Settings] = None
    model: Model = None
    variant: Variant = None
    params_type: ClassVar[type] = DetectParams  # PointRequest: PointParams

    def check(self, config: Config) -> tuple[SkillParams, SamplingSettings]:
        _check_text("object", self.object, config)
        return self.params_type(object=self.object), (self.settings or Settings()).check(config)


class PointRequest(DetectRequest):
    """POST /v1/point"""

    # The Moondream client may send spatial_refs here; Moondream 2 cannot use
    # them for pointing, so say so instead of silently ignoring them.
    spatial_refs: Annotated[
        Optional[list[SpatialRef]],
        Meta(description="Not supported by Moondream 2 for point; must be absent or empty."),
    ] = None

    params_type: ClassVar[type] = PointParams

    def check(self, config: Config) -> tuple[SkillParams, SamplingSettings]:
        if self.spatial_refs:
            raise InvalidValue("spatial_refs are only supported by /v1/query")
        return super().check(config)


# Route path -> (skill, request schema); app.py builds its routes from this and
# an OpenAPI generator can walk it too.
ROUTES: dict[str, tuple[str, type[msgspec.Struct]]] = {
    "/v1/caption": ("caption", CaptionRequest),
    "/v1/query": ("query", QueryRequest),
    "/v1/detect": ("detect", DetectRequest),
    "/v1/point": ("point", PointRequest),
}
