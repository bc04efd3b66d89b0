"""The HTTP edge under abuse and overload, at the default settings: the probes of
issue 15, measured (numbers in docs/reliability.md, "The HTTP edge").

    .venv/bin/python -m bench.http_edge                 # starts the stack (tiny model, API key set)
    .venv/bin/python -m bench.http_edge --url http://127.0.0.1:5000 --api-key KEY

Three phases, each `--duration` seconds at most, all on loopback:

  trickle  one client sends /health/live, /health and a keyed /v1/query in turn,
           first alone (for half the time), then while `--tricklers` connections
           send one header byte a second (and reconnect when cut): how long
           those take.
  streams  40 streamed long captions that are never read, while /health/live and
           a wrong-key /v1 request are timed.
  burst    500 non-streamed captions at once, while /health/live and /health are
           polled: how many 200 and 429, and how fast each kind came back.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import socket
import statistics
import threading
import time
import urllib.parse

from tests.frontend_helpers import SMALL_IMAGE, HealthProbe, burst, timed
from tests.stack import running_stack

IMAGE_URL = "data:image/png;base64," + base64.b64encode(SMALL_IMAGE.read_bytes()).decode()
CLIENT_TIMEOUT_S = 30


def summary(times: list[float]) -> str:
    if not times:
        return "none"
    return f"n={len(times)} p50={statistics.median(times):.3f} s max={max(times):.3f} s"


class Tricklers(threading.Thread):
    """`count` connections that each send one byte of a never-ending header a second."""

    HEAD = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000

    def __init__(self, port: int, count: int):
        super().__init__(daemon=True)
        self.port, self.count = port, count
        self.stop = threading.Event()
        self.cut = 0  # connections the server closed (and we reopened)

    def connect(self) -> list:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.setblocking(False)
        return [sock, 0]

    def run(self):
        conns = [self.connect() for _ in range(self.count)]
        while not self.stop.wait(1.0):
            for i, (sock, sent) in enumerate(conns):
                try:
                    if sock.recv(65536) is not None:  # an answer (408) or EOF: we were cut
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
                    self.cut += 1
                    conns[i] = self.connect()
                    continue
                try:
                    sock.send(self.HEAD[sent:sent + 1])
                    conns[i][1] += 1
                except OSError:
                    pass  # seen at the next recv
        for sock, _ in conns:
            sock.close()


def trickle_phase(port: int, key: str, tricklers: int, duration: float) -> dict:
    """The normal requests alone for a while, then under the trickling attack."""
    return {"baseline": normal_requests(port, key, 0, duration / 2),
            "with_tricklers": normal_requests(port, key, tricklers, duration)}


def normal_requests(port: int, key: str, tricklers: int, duration: float) -> dict:
    query = json.dumps({"question": "Why?", "settings": {"max_tokens": 8}}).encode()
    normal = [("/health/live", None, {}), ("/health", None, {}), ("/v1/query", query, {"X-Moondream-Auth": key})]
    times: dict[str, list[float]] = {path: [] for path, _, _ in normal}
    failures = []
    attack = Tricklers(port, tricklers)
    attack.start()
    time.sleep(2)  # every trickler connected
    end = time.monotonic() + duration
    while time.monotonic() < end:
        for path, body, headers in normal:
            try:
                status, took, _ = timed(port, "POST" if body else "GET", path, body, headers, CLIENT_TIMEOUT_S)
                times[path].append(took)
                if status != 200:
                    failures.append(status)
            except OSError as err:
                failures.append(type(err).__name__)
    attack.stop.set()
    attack.join()
    return {"normal": {path: summary(t) for path, t in times.items()}, "failures": failures,
            "tricklers_cut": attack.cut}


def streams_phase(port: int, key: str, duration: float) -> dict:
    body = json.dumps({"image_url": IMAGE_URL, "length": "long", "stream": True,
                       "settings": {"max_tokens": 2048}}).encode()
    request = (b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
               b"X-Moondream-Auth: %s\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(body))) + body
    streams = []
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(request)
        streams.append(sock)
    time.sleep(1)
    statuses = []
    for sock in streams:  # only the status line: the rest is left unread
        with contextlib.suppress(OSError):
            statuses.append(int(sock.recv(64).split(b" ", 2)[1]))
    live, unauthorized, failures = [], [], []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        for times, headers, path, want in ((live, {}, "/health/live", 200),
                                           (unauthorized, {"X-Moondream-Auth": "wrong"}, "/v1/caption", 401)):
            try:
                status, took, _ = timed(port, "POST" if want == 401 else "GET", path, body if want == 401 else None,
                                        headers, CLIENT_TIMEOUT_S)
                times.append(took)
                if status != want:
                    failures.append((path, status))
            except OSError as err:
                failures.append((path, type(err).__name__))
        time.sleep(0.2)
    for sock in streams:
        sock.close()
    return {"streams": {s: statuses.count(s) for s in sorted(set(statuses))},
            "health_live": summary(live), "wrong_key_401": summary(unauthorized), "failures": failures}


def burst_phase(port: int, key: str) -> dict:
    body = json.dumps({"image_url": IMAGE_URL, "settings": {"max_tokens": 16}}).encode()
    request = (b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
               b"X-Moondream-Auth: %s\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(body))) + body
    with HealthProbe(port) as probe:
        time.sleep(0.5)
        results = burst(port, 500, request, 150)
        time.sleep(0.5)
    by_status: dict[int, list[float]] = {}
    for status, took, _ in results:
        by_status.setdefault(status, []).append(took)
    return {"statuses": {s: summary(t) for s, t in sorted(by_status.items())},
            "health": {path: summary(t) for path, t in probe.times.items()}, "health_failures": probe.failures}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running stack (loopback); default: start one")
    ap.add_argument("--api-key", default="bench-key")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--tricklers", type=int, default=200)
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack_scope:
        if args.url:
            port = urllib.parse.urlsplit(args.url).port
        else:
            stack = stack_scope.enter_context(running_stack(VLM_API_KEY=args.api_key))
            warm_up_keyed(stack, args.api_key)
            port = stack.port
        results = {"trickle": trickle_phase(port, args.api_key, args.tricklers, args.duration),
                   "streams": streams_phase(port, args.api_key, args.duration),
                   "burst": burst_phase(port, args.api_key)}
    print(json.dumps(results, indent=2))
    return results


def warm_up_keyed(stack, key: str) -> None:
    """The first generation is slow; send one before measuring."""
    body = json.dumps({"question": "Hi", "settings": {"max_tokens": 4}}).encode()
    status, _, raw = timed(stack.port, "POST", "/v1/query", body, {"X-Moondream-Auth": key}, 120)
    if status != 200:
        raise RuntimeError(f"warm-up failed: {status} {raw[:200]!r}")


if __name__ == "__main__":
    main()
