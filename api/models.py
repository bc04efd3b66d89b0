"""Which model a request asks for: the base model or one of its fine-tuned variants.

Clients name a variant in one of three ways, all accepted on every /v1 route:
`settings.variant` (the reference's field), a top-level `variant` (the official
Node client) and `model` = "<model name>/<variant id>" (the official Python
client made with `md.vl(endpoint=..., model=...)`).  `model` alone may also name
the base model, by MODEL_NAME or one of MODEL_ALIASES (names other clients send
by default, e.g. "moondream3-preview" from the Python client's chat()).

Whether a variant exists is the GPU worker's to say (it owns the files): an
unknown one comes back as a 404 from there, before any GPU work."""
from __future__ import annotations

from typing import Optional

from shared.config import Config
from shared.variant_ids import BadVariantId, check_variant_id


class ModelNotFound(LookupError):
    """`model` names nothing this server serves (HTTP 404)."""


class ConflictingVariants(ValueError):
    """The request names two different variants (HTTP 422)."""


class ModelNames:
    def __init__(self, config: Config):
        self.base = config.model_name
        self.aliases = tuple(a.strip() for a in config.model_aliases.split(",") if a.strip())

    def names_base(self, name: str) -> bool:
        return name == self.base or name in self.aliases

    def variant_of(self, model: Optional[str]) -> Optional[str]:
        """The variant a `model` value selects (None: the base model).  Raises
        ModelNotFound for a name not served, BadVariantId for a malformed id."""
        if model is None or self.names_base(model):
            return None
        base, slash, variant = model.rpartition("/")
        if slash and self.names_base(base):
            return check_variant_id(variant)
        raise ModelNotFound(f"model {model[:100]!r} is not served here; use {self.served_text()}")

    def model_id(self, variant: Optional[str]) -> str:
        """The name a response reports for what answered."""
        return f"{self.base}/{variant}" if variant else self.base

    def served_text(self) -> str:
        aliases = f" (also called {', '.join(self.aliases)})" if self.aliases else ""
        return f"{self.base!r}{aliases}, or '{self.base}/<variant id>' for a fine-tuned variant"


def choose_variant(names: ModelNames, model: Optional[str], variant: Optional[str],
                   settings_variant: Optional[str]) -> Optional[str]:
    """The one variant a request asks for, however it says so."""
    given = {v for v in (names.variant_of(model), variant, settings_variant) if v is not None}
    if len(given) > 1:
        raise ConflictingVariants(f"the request names different variants: {', '.join(sorted(given))}")
    return check_variant_id(given.pop()) if given else None


__all__ = ["BadVariantId", "ConflictingVariants", "ModelNames", "ModelNotFound", "choose_variant"]
