"""Variant ids (`<fine-tune id>@<step>`, e.g. `ft-alpha@100`) and model names.

Shared by the front end (which refuses a bad id with a 400 before any work) and
the GPU worker (which turns an id into a directory name).  No torch here."""
from __future__ import annotations

import re

MAX_VARIANT_ID = 128

# Nothing that can name another directory: no "/", "\", NUL or space, a first
# character that is a letter or digit (no leading dot), and no ".." anywhere.
_VARIANT_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_@+-]|\.(?!\.)){0,%d}" % (MAX_VARIANT_ID - 1))


class BadVariantId(ValueError):
    """A variant id that is not well-formed (HTTP 400)."""

    status = 400
    code = "invalid_variant_id"


def check_variant_id(variant: object) -> str:
    """Return the id, or raise BadVariantId: ids become directory names."""
    if not isinstance(variant, str) or not _VARIANT_ID.fullmatch(variant):
        shown = repr(variant)[:80]
        raise BadVariantId(f"variant {shown} is not a valid variant id (letters, digits, . _ @ + -, "
                           f"at most {MAX_VARIANT_ID} characters, no path)")
    return variant
