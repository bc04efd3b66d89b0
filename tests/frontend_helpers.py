"""Helpers for the front-end tests that run against the real stack."""
from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_IMAGE = REPO / "tests/conformance/main/images/small_96x64.png"


def warm_up(stack, timeout: float = 60.0) -> None:
    """Send one small caption until it succeeds.

    The first generation after start-up is slow (allocation, warm-up), and a
    GPU worker that (re)registers late makes the broker answer 503 for a
    moment; the front-end tests should not depend on that timing."""
    body = json.dumps({
        "image_url": "data:image/png;base64," + base64.b64encode(SMALL_IMAGE.read_bytes()).decode(),
        "settings": {"max_tokens": 4, "temperature": 0},
    }).encode()
    end = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(stack.url + "/v1/caption", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
                return
        except urllib.error.HTTPError as err:
            if err.code != 503 or time.monotonic() > end:
                raise
        time.sleep(0.5)
        stack.wait_ready(max(1.0, end - time.monotonic()))
