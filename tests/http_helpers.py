"""Small HTTP helpers for the end-to-end tests: a conformance image as a data URL, and one
JSON request to a running stack that returns (status, body) whatever the status."""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request

from tests.engine_helpers import CONFORMANCE


def fixture_data_url(set_name: str, image_name: str) -> str:
    """A conformance set's image file, byte for byte, as a data URL."""
    with open(os.path.join(CONFORMANCE, set_name, "images", image_name), "rb") as f:
        raw = f.read()
    kind = "jpeg" if image_name.endswith(".jpg") else "png"
    return f"data:image/{kind};base64,{base64.b64encode(raw).decode()}"


def http_json(stack, method: str, path: str, body: dict | None = None,
              headers: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    """One request to `stack.url + path`; an HTTP error status is returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{stack.url}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
