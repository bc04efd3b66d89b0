"""Which Moondream family a model source holds, read without loading it, and the name a
server reports for it.  The front end, which never loads the model, uses this to answer
to the right name: `moondream3-preview` is Moondream 3 when one is served, and an alias
of Moondream 2 only while none is (the official client's chat() asks for it by default)."""
from __future__ import annotations

import json
import os

MOONDREAM2, MOONDREAM3 = "moondream2", "moondream3"
MOONDREAM3_HUB_REPO = "moondream/moondream3-preview"
# The id a response's `model` carries, and other names accepted for it, per family.
MODEL_IDS = {MOONDREAM2: "moondream2", MOONDREAM3: "moondream3-preview"}
DEFAULT_ALIASES = {MOONDREAM2: ("moondream3-preview", "vikhyatk/moondream2"), MOONDREAM3: (MOONDREAM3_HUB_REPO,)}


def family_of(source: str) -> str:
    """MOONDREAM_MODEL's value -> "moondream2" or "moondream3": the hub id, random:md3-*,
    or a local directory whose config.json says "model": "moondream3" (or has text.moe)."""
    if source == MOONDREAM3_HUB_REPO or source.startswith("random:md3"):
        return MOONDREAM3
    try:
        with open(os.path.join(source, "config.json")) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return MOONDREAM2
    inner = raw.get("config", raw) if isinstance(raw, dict) else {}
    text = inner.get("text", {}) if isinstance(inner, dict) else {}
    moondream3 = raw.get("model") == MOONDREAM3 or (isinstance(text, dict) and "moe" in text)
    return MOONDREAM3 if moondream3 else MOONDREAM2
