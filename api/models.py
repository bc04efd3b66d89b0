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
from shared.model_family import DEFAULT_ALIASES, MODEL_IDS, served_models
from shared.variant_ids import BadVariantId, check_variant_id


class ModelNotFound(LookupError):
    """`model` names nothing this server serves (HTTP 404)."""


class ConflictingVariants(ValueError):
    """The request names two different variants (HTTP 422)."""


class ModelNames:
    """The models served (MOONDREAM_MODELS, or MOONDREAM_MODEL alone), their ids and aliases.
    The first is the default, for requests that name none.  A family's id is an alias of the
    first model of that family (so `moondream3-preview` is Moondream 3 whenever one is served);
    the default aliases, or MODEL_ALIASES for the first model, come after."""

    def __init__(self, config: Config):
        self.models = served_models(config)
        self.ids = [m.id for m in self.models]
        self.base = self.ids[0]
        given = tuple(a.strip() for a in config.model_aliases.split(",") if a.strip())
        self.alias_of: dict[str, str] = {}
        for m in self.models:
            if MODEL_IDS[m.family] not in self.ids:
                self.alias_of.setdefault(MODEL_IDS[m.family], m.id)
        for i, m in enumerate(self.models):
            for alias in (given if i == 0 and given else DEFAULT_ALIASES[m.family]):
                if alias not in self.ids:
                    self.alias_of.setdefault(alias, m.id)
        self.aliases = tuple(a for a, target in self.alias_of.items() if target == self.base)

    def names_base(self, name: str) -> bool:
        return name == self.base or self.alias_of.get(name) == self.base

    def resolve(self, model: Optional[str]) -> tuple[str, Optional[str]]:
        """A `model` value -> (the served model's id, the variant it selects or None).  Raises
        ModelNotFound for a name not served, BadVariantId for a malformed id."""
        if model is None:
            return self.base, None
        if model in self.ids or model in self.alias_of:
            return self.alias_of.get(model, model), None
        base, slash, variant = model.rpartition("/")
        if slash and (base in self.ids or base in self.alias_of):
            return self.alias_of.get(base, base), check_variant_id(variant)
        raise ModelNotFound(f"model {model[:100]!r} is not served here; use {self.served_text()}")

    def variant_of(self, model: Optional[str]) -> Optional[str]:
        """The variant a `model` value selects (None: the model itself)."""
        return self.resolve(model)[1]

    def model_id(self, variant: Optional[str], model_id: Optional[str] = None) -> str:
        """The name a response reports for what answered."""
        base = model_id or self.base
        return f"{base}/{variant}" if variant else base

    def submit_model(self, model_id: str) -> str:
        """Submit.model: the id when several models are served (the broker routes by it), else ""."""
        return model_id if len(self.ids) > 1 else ""

    def served_text(self) -> str:
        parts = []
        for model_id in self.ids:
            aliases = [a for a, target in self.alias_of.items() if target == model_id]
            parts.append(repr(model_id) + (f" (also called {', '.join(aliases)})" if aliases else ""))
        return f"{', '.join(parts)}, or '<model>/<variant id>' for a fine-tuned variant"


def choose_variant(names: ModelNames, model: Optional[str], variant: Optional[str],
                   settings_variant: Optional[str]) -> Optional[str]:
    """The one variant a request asks for, however it says so."""
    given = {v for v in (names.variant_of(model), variant, settings_variant) if v is not None}
    if len(given) > 1:
        raise ConflictingVariants(f"the request names different variants: {', '.join(sorted(given))}")
    return check_variant_id(given.pop()) if given else None


__all__ = ["BadVariantId", "ConflictingVariants", "ModelNames", "ModelNotFound", "choose_variant"]
