"""Helpers for the front-end tests that run against the real stack."""
from __future__ import annotations

import base64
import http.client
import json
import selectors
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

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


def timed(port: int, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None,
          timeout: float = 60) -> tuple[int, float, bytes]:
    """(status, seconds, body) of one request on a fresh connection to 127.0.0.1:`port`."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, {**({"Content-Type": "application/json"} if body is not None else {}),
                                          **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, time.monotonic() - started, raw
    finally:
        conn.close()


class HealthProbe(threading.Thread):
    """Polls /health/live and /health until stopped (use it as a context manager);
    records how long each answer took and any that was not a 200."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.times: dict[str, list[float]] = {"/health/live": [], "/health": []}
        self.failures: list = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for path, times in self.times.items():
                try:
                    status, took, raw = timed(self.port, "GET", path, timeout=30)
                    times.append(took)
                    if status != 200:
                        self.failures.append((path, status, raw[:200]))
                except OSError as err:
                    self.failures.append((path, repr(err)))
            self.stop.wait(0.1)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(timeout=40)

    def worst(self) -> dict[str, float]:
        return {path: max(times, default=float("nan")) for path, times in self.times.items()}


def burst(port: int, count: int, request: bytes, limit_s: float) -> list[tuple[int, float, bytes]]:
    """`count` copies of the raw HTTP `request` (which should say Connection: close),
    sent at once on their own connections; (status, seconds until answered,
    response) each.  Status 0: no answer within `limit_s`."""
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE, {"out": request, "in": b""})
    results = []

    def finish(sock, state):
        selector.unregister(sock)
        sock.close()
        data = state["in"]
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        results.append((status, time.monotonic() - started, data))

    while selector.get_map() and time.monotonic() - started < limit_s:
        for key, events in selector.select(timeout=0.5):
            sock, state = key.fileobj, key.data
            try:
                if events & selectors.EVENT_WRITE:
                    state["out"] = state["out"][sock.send(state["out"]):]
                    if not state["out"]:
                        selector.modify(sock, selectors.EVENT_READ, state)
                    continue
                piece = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                piece = b""
            if piece:
                state["in"] += piece
            else:
                finish(sock, state)
    for key in list(selector.get_map().values()):  # never answered
        finish(key.fileobj, {"in": b""})
    return results
