"""The HTTP edge under abuse and overload (frontend/edge.py), over real sockets on
127.0.0.1 against the real stack: connections that trickle their headers do not
lock anyone out, a burst beyond MAX_IN_FLIGHT gets fast 429s, health answers
through it all, a CR/LF in a URL cannot forge a log line, ambiguous or broken
framing is refused, and a client that sends a too-large body before reading
gets the JSON 413 rather than a reset connection.

The stack runs with small limits so that each test takes seconds:
MAX_IN_FLIGHT=4 and 3 s to send headers (or a body).
"""
from __future__ import annotations

import base64
import json
import socket
import statistics
import time
import urllib.error
import urllib.request

import pytest

from tests.frontend_helpers import SMALL_IMAGE, HealthProbe, burst, timed, warm_up
from tests.stack import ProcessGroup, free_port, running_stack, wait_for

pytestmark = pytest.mark.timeout(240)

MAX_IN_FLIGHT = 4
READ_TIMEOUT_S = 3  # HTTP_HEADER_TIMEOUT and HTTP_BODY_TIMEOUT of the test stack
REQUEST_TIMEOUT_S = 20  # the stack's deadline: nothing may wait longer
FAST_S = 1.0  # "at once", with slack for a busy 2-core machine
MiB = 1024 * 1024
IMAGE_URL = "data:image/png;base64," + base64.b64encode(SMALL_IMAGE.read_bytes()).decode()
CAPTION = json.dumps({"image_url": IMAGE_URL, "settings": {"max_tokens": 4, "temperature": 0}}).encode()


@pytest.fixture(scope="module")
def stack():
    with running_stack(MAX_IN_FLIGHT=MAX_IN_FLIGHT, HTTP_HEADER_TIMEOUT=READ_TIMEOUT_S,
                       HTTP_BODY_TIMEOUT=READ_TIMEOUT_S, REQUEST_TIMEOUT=REQUEST_TIMEOUT_S) as s:
        warm_up(s)
        yield s


# ---------------------------------------------------------------- helpers
NORMAL_REQUESTS = [("GET", "/health/live", None, 200), ("GET", "/health", None, 200),
                   ("POST", "/v1/query", b'{"question": 1}', 400)]  # a 400 still takes a request thread


def normal_round(stack) -> list[float]:
    """One of each normal request; their times (each must get its usual answer)."""
    times = []
    for method, path, body, want in NORMAL_REQUESTS:
        status, took, raw = timed(stack.port, method, path, body)
        assert status == want, (path, status, raw[:200])
        times.append(took)
    return times


def read_until_closed(sock: socket.socket, limit_s: float) -> bytes:
    sock.settimeout(limit_s)
    data = b""
    try:
        while piece := sock.recv(65536):
            data += piece
    except socket.timeout:
        data += b"<no close>"
    return data


def raw_exchange(stack, data: bytes, limit_s: float = 10) -> tuple[bytes, float]:
    """Send raw bytes, read until the server closes: (everything read, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", stack.port), timeout=limit_s) as sock:
        sock.sendall(data)
        return read_until_closed(sock, limit_s), time.monotonic() - started


def json_error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), answer[:300]
    return int(head.split(b" ", 2)[1]), json.loads(body)


# ---------------------------------------------------------------- no lockout
def test_connections_trickling_headers_do_not_lock_anyone_out(stack):
    baseline = max(max(normal_round(stack)) for _ in range(3))
    tricklers = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
        sock.setblocking(False)
        tricklers.append(sock)
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000  # never finished
    started = time.monotonic()
    answers = {sock: b"" for sock in tricklers}
    closed_at = {}
    slowest_normal = 0.0
    try:
        sent = 0
        while len(closed_at) < len(tricklers) and time.monotonic() - started < READ_TIMEOUT_S + 10:
            for sock in tricklers:  # one more byte each, about every half second
                if sock in closed_at:
                    continue
                try:
                    piece = sock.recv(65536)
                    answers[sock] += piece
                    if not piece or b"\r\n\r\n" in answers[sock]:
                        closed_at[sock] = time.monotonic() - started
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    closed_at[sock] = time.monotonic() - started
                    continue
                try:
                    sock.send(head[sent:sent + 1])
                except OSError:
                    closed_at[sock] = time.monotonic() - started
            sent += 1
            # Meanwhile, everyone else is served as usual.
            slowest_normal = max(slowest_normal, *normal_round(stack))
            time.sleep(0.3)
    finally:
        for sock in tricklers:
            sock.close()
    assert slowest_normal < baseline + 1.0, f"normal requests took up to {slowest_normal:.2f} s (baseline {baseline:.2f} s)"
    # And the tricklers were answered 408 and closed once their time was up, not before.
    assert len(closed_at) == len(tricklers), f"{len(tricklers) - len(closed_at)} trickling connections still open"
    assert min(closed_at.values()) >= READ_TIMEOUT_S - 0.5, sorted(closed_at.values())[:5]
    timed_out = [a for a in answers.values() if a.startswith(b"HTTP/1.1 408")]
    assert len(timed_out) == len(tricklers), [a[:80] for a in answers.values() if not a.startswith(b"HTTP/1.1 408")][:3]
    assert json_error(timed_out[0])[1]["error"]["code"] == "request_timeout"
    print(f"200 trickling connections: normal requests took up to {slowest_normal:.2f} s "
          f"(baseline {baseline:.2f} s); tricklers cut after {min(closed_at.values()):.1f}-{max(closed_at.values()):.1f} s")


def test_a_body_that_trickles_is_cut_off(stack):
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"image_url\": ")
        started = time.monotonic()
        answer = read_until_closed(sock, READ_TIMEOUT_S + 5)
    took = time.monotonic() - started
    status, body = json_error(answer)
    assert status == 408 and body["error"]["code"] == "request_timeout", body
    assert READ_TIMEOUT_S - 0.5 <= took < READ_TIMEOUT_S + 3, f"{took:.1f} s"


# ---------------------------------------------------------------- backpressure at the door
def test_a_burst_beyond_max_in_flight_gets_fast_429s_and_health_still_answers(stack):
    request = (b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(CAPTION)) + CAPTION
    with HealthProbe(stack.port) as probe:
        time.sleep(0.3)
        results = burst(stack.port, 500, request, REQUEST_TIMEOUT_S)
        time.sleep(0.3)
    statuses = [status for status, _, _ in results]
    assert set(statuses) == {200, 429}, {s: statuses.count(s) for s in set(statuses)}
    refused = [(took, data) for status, took, data in results if status == 429]
    for took, data in refused:
        head = data.partition(b"\r\n\r\n")[0]
        assert b"\r\nRetry-After: 1\r\n" in head, head
        assert json_error(data)[1]["error"]["code"] == "overloaded"
    refused_times = sorted(took for took, _ in refused)
    answered_times = sorted(took for status, took, _ in results if status == 200)
    # Refused at the door: no waiting for a thread or for the model.
    assert statistics.median(refused_times) < FAST_S, refused_times[::50]
    assert max(refused_times) < 5 * FAST_S, refused_times[-5:]
    assert max(answered_times) < REQUEST_TIMEOUT_S, answered_times[-5:]
    assert not probe.failures, probe.failures
    worst = probe.worst()
    assert all(took < FAST_S for took in worst.values()), worst
    print(f"500 at once, MAX_IN_FLIGHT={MAX_IN_FLIGHT}: {len(answered_times)} x 200 (slowest "
          f"{max(answered_times):.2f} s), {len(refused)} x 429 (median {statistics.median(refused_times):.3f} s, "
          f"slowest {max(refused_times):.2f} s); health during it: {worst}")
    assert stack.health()[1]["queue"]["in_flight"] == 0


def start_long_streams(stack, count: int) -> list[socket.socket]:
    """`count` streamed captions of a few hundred tokens each (seconds on the CPU),
    sent together; returns once each has sent its first event."""
    body = json.dumps({"image_url": IMAGE_URL, "length": "long", "stream": True,
                       "settings": {"temperature": 0, "max_tokens": 300}}).encode()
    socks = [socket.create_connection(("127.0.0.1", stack.port), timeout=30) for _ in range(count)]
    for sock in socks:
        sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
    for sock in socks:
        head = b""
        while b"data: " not in head:
            piece = sock.recv(4096)
            assert piece, head
            head += piece
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return socks


def test_open_streams_count_until_they_end(stack):
    streams = start_long_streams(stack, MAX_IN_FLIGHT)
    try:
        status, took, raw = timed(stack.port, "POST", "/v1/caption", CAPTION)
        assert status == 429 and took < FAST_S, (status, took, raw[:200])
        status, took, _ = timed(stack.port, "GET", "/health/live")
        assert status == 200 and took < FAST_S, (status, took)
        for sock in streams:  # each stream ends with its final event (on a crowded machine, maybe a 504)
            tail = read_until_closed(sock, REQUEST_TIMEOUT_S + 5)
            assert b'"completed":true' in tail, tail[-300:]
    finally:
        for sock in streams:
            sock.close()
    wait_for(lambda: timed(stack.port, "POST", "/v1/caption", CAPTION)[0] == 200, 10, "a slot after the streams ended")


# ---------------------------------------------------------------- logs
FORGED = "2026-01-01 00:00:00,000 ERROR frontend[1] frontend: forged"
FORGING_PATH = "/zz%0d%0a" + FORGED.replace(" ", "%20")


def test_a_crlf_in_the_path_forges_no_text_log_line(stack):
    status, _, _ = timed(stack.port, "GET", FORGING_PATH)
    assert status == 404
    wait_for(lambda: "/zz" in stack.log("frontend_00"), 10, "the access log line")
    lines = stack.log("frontend_00").splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")], lines[-5:]
    logged = [line for line in lines if "/zz" in line]
    assert len(logged) == 1 and "/zz\\x0d\\x0a2026-01-01" in logged[0], logged


def test_a_crlf_in_the_path_forges_no_json_log_line(stack, tmp_path):
    # A second front end on the same broker, logging JSON.
    group = ProcessGroup(stack.env, tmp_path)
    port = free_port()
    proc = group.start("frontend", name="frontend-json", PORT=port, LOG_FORMAT="json")
    try:
        wait_for(lambda: timed(port, "GET", "/health/live")[0] == 200, 30, "the JSON front end")
        assert timed(port, "GET", FORGING_PATH)[0] == 404
        wait_for(lambda: "/zz" in proc.log_path.read_text(), 10, "the access log line")
    finally:
        group.stop_all()
    entries = [json.loads(line) for line in proc.log_path.read_text().splitlines() if line.strip()]  # every line is JSON
    logged = [entry for entry in entries if "/zz" in entry["msg"]]
    assert len(logged) == 1 and logged[0]["msg"] == f"GET /zz\r\n{FORGED} 404", logged


# ---------------------------------------------------------------- framing
def test_content_length_and_transfer_encoding_together_are_refused(stack):
    answer, took = raw_exchange(stack, b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                                       b"0\r\n\r\nGET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = json_error(answer)  # read_until_closed: the server closed the connection
    assert status == 400 and "Transfer-Encoding" in body["error"]["message"], body
    assert answer.count(b"HTTP/1.1") == 1, answer  # the smuggled request was not answered
    assert took < FAST_S * 5


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /health/live HTTP/1.1\nHost: x\n\n", id="bare-LF"),
    pytest.param(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n{}", id="huge-chunk"),
    pytest.param(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", id="bad-chunk-size"),
])
def test_malformed_framing_is_answered_at_once(stack, request_bytes):
    answer, took = raw_exchange(stack, request_bytes)
    status, body = json_error(answer)
    assert status in (400, 413), (status, body)
    assert took < FAST_S * 5, f"{took:.1f} s"


# ---------------------------------------------------------------- a body far too large
def test_urllib_sending_a_60_mb_body_gets_the_json_413(stack):
    # urllib (and so the official client) sends the whole body before reading the
    # answer; closing at once would reset the connection under it.
    req = urllib.request.Request(stack.url + "/v1/caption", b"A" * (60 * MiB), {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=60)
    assert caught.value.code == 413
    far_over = json.loads(caught.value.read())
    assert far_over["error"]["code"] == "payload_too_large"
    assert far_over["request_id"] and far_over["request_id"] == caught.value.headers["X-Request-ID"]
    status, _, _ = timed(stack.port, "GET", "/health/live")
    assert status == 200

    # Just over the limit the app answers, not waitress: the same words.
    limit = stack.config.max_body_bytes
    req = urllib.request.Request(stack.url + "/v1/caption", b"A" * (limit + 1), {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=60)
    just_over = json.loads(caught.value.read())
    assert caught.value.code == 413 and just_over["request_id"]
    assert just_over["error"] == far_over["error"] == {
        "code": "payload_too_large", "message": f"the request body is larger than MAX_BODY_BYTES ({limit} bytes)"}
