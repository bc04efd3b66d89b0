"""A request body -> its typed struct, and the variant it asks for; failures as ApiErrors."""
from __future__ import annotations

from typing import Optional

import msgspec

from api import models, schemas
from api.errors import ApiError


def top_level_fields(body: bytes) -> list[str]:
    """The names of a JSON object's fields (values skipped, not decoded); [] if it is not one."""
    try:
        return list(msgspec.json.decode(body, type=dict[str, msgspec.Raw]))
    except (msgspec.DecodeError, RecursionError):
        return []


def parse_request(body: bytes, schema: type[msgspec.Struct]) -> msgspec.Struct:
    try:
        return schemas.decode_body(body, schema)
    except msgspec.ValidationError as ex:  # before DecodeError: it is a subclass
        raise ApiError(400, "invalid_request", str(ex)) from None
    except msgspec.DecodeError as ex:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {ex}") from None
    except RecursionError:  # msgspec skips unknown fields recursively: {"a":{"a":...}} 2000 deep
        raise ApiError(400, "invalid_json", "the request body is nested too deeply") from None


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
