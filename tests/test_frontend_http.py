"""The front end over real HTTP (waitress) on the real stack with the tiny test
model: the official Moondream client works against it, the SSE stream has the
cloud API's shape, a client that hangs up stops the work, /health tells the truth.
"""
from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import time
import urllib.error
from pathlib import Path

import moondream
import pytest
from PIL import Image

from tests.frontend_helpers import warm_up

REPO = Path(__file__).resolve().parent.parent
IMAGE_PATH = REPO / "tests/conformance/main/images/small_96x64.png"
IMAGE_URL = "data:image/png;base64," + base64.b64encode(IMAGE_PATH.read_bytes()).decode()
GREEDY = {"temperature": 0, "top_p": 0, "max_tokens": 24}
METRIC_KEYS = {"input_tokens", "output_tokens", "prefill_time_ms", "decode_time_ms", "ttft_ms"}


@pytest.fixture(scope="module", autouse=True)
def warm(stack):
    warm_up(stack)


def request(stack, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    return resp, resp.read()


def sse_events(raw: bytes) -> list[dict]:
    blocks = raw.decode().split("\n\n")
    assert blocks[-1] == ""  # every event ends with a blank line
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block[len("data: "):]))
    return events


def test_official_client_works(stack):
    model = moondream.vl(endpoint=stack.url + "/v1")
    try:
        exercise_official_client(model)
    except urllib.error.HTTPError as err:  # the client hides the body: show it
        pytest.fail(f"{err.code} {err.read()!r}\n{stack.log('frontend_00')[-2000:]}\n{stack.log('broker')[-2000:]}")


def exercise_official_client(model):
    image = Image.open(IMAGE_PATH)
    assert isinstance(model.caption(image, length="short", settings=GREEDY)["caption"], str)
    streamed = "".join(model.caption(image, stream=True, settings=GREEDY)["caption"])
    assert streamed == model.caption(image, settings=GREEDY)["caption"]
    assert isinstance(model.query(image, "What is this?", settings=GREEDY)["answer"], str)
    assert "reasoning" in model.query(image, "Where?", reasoning=True, settings=GREEDY)
    assert isinstance(model.query(question="Why?", settings=GREEDY)["answer"], str)  # text only
    objects = model.detect(image, "square", settings={"max_objects": 3})["objects"]
    assert len(objects) <= 3 and all(set(o) == {"x_min", "y_min", "x_max", "y_max"} for o in objects)
    points = model.point(image, "square", settings={"max_objects": 3})["points"]
    assert len(points) <= 3 and all(set(p) == {"x", "y"} for p in points)


def test_stream_has_the_cloud_shape(stack):
    resp, raw = request(stack, "POST", "/v1/caption", {"image_url": IMAGE_URL, "stream": True, "settings": GREEDY})
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    events = sse_events(raw)
    *chunks, final = events
    assert chunks and all(set(e) == {"chunk", "completed"} and e["completed"] is False for e in chunks)
    assert final["completed"] is True and final["chunk"] == ""
    assert final["request_id"] == resp.getheader("X-Request-ID")
    assert set(final["metrics"]) == METRIC_KEYS
    assert final["metrics"]["output_tokens"] <= GREEDY["max_tokens"]
    assert final["finish_reason"] in ("stop", "length")

    _, plain = request(stack, "POST", "/v1/caption", {"image_url": IMAGE_URL, "settings": GREEDY})
    body = json.loads(plain)
    assert "".join(e["chunk"] for e in chunks) == body["caption"]  # greedy: same text both ways
    assert set(body) == {"request_id", "caption", "metrics", "finish_reason"}


def test_streamed_query_with_reasoning_ends_with_it(stack):
    resp, raw = request(stack, "POST", "/v1/query",
                        {"image_url": IMAGE_URL, "question": "Where is it?", "reasoning": True, "stream": True,
                         "settings": GREEDY}, {"X-Request-ID": "trace-7"})
    assert resp.status == 200 and resp.getheader("X-Request-ID") == "trace-7"
    final = sse_events(raw)[-1]
    assert final["completed"] is True and final["request_id"] == "trace-7"
    assert "reasoning" in final


def broker_outcome(stack, request_id: str, timeout: float = 20.0) -> str:
    """The broker's one log line for a finished request.  A client-chosen
    X-Request-ID reaches the broker with a uniqueness suffix (".<hex>")."""
    pattern = re.compile(rf"request_id={re.escape(request_id)}(\.[0-9a-f]+)? outcome=")
    deadline = time.monotonic() + timeout
    while True:
        for line in stack.log("broker").splitlines():
            if pattern.search(line):
                return line
        assert time.monotonic() < deadline, f"the broker never finished {request_id}"
        time.sleep(0.1)


def start_long_caption(stack, stream: bool, request_id: str) -> socket.socket:
    """A caption of ~1300 tokens: seconds of decoding on the CPU unless cancelled."""
    body = json.dumps({"image_url": IMAGE_URL, "length": "long", "stream": stream,
                       "settings": {"temperature": 0, "max_tokens": 2048}}).encode()
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
    sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"X-Request-ID: %s\r\nContent-Length: %d\r\n\r\n" % (request_id.encode(), len(body)) + body)
    return sock


def test_hanging_up_mid_stream_cancels_the_request(stack):
    with start_long_caption(stack, stream=True, request_id="hangup-stream") as sock:
        head = b""
        while b"data: " not in head:  # headers and the first event, then hang up
            head += sock.recv(4096)
    assert "code=cancelled" in broker_outcome(stack, "hangup-stream"), stack.log("broker")[-1000:]
    assert stack.health()[1]["queue"]["in_flight"] == 0


def test_hanging_up_while_waiting_cancels_the_request(stack):
    # No stream: nothing is written until the end, so waitress has to notice the
    # closed connection by itself (channel_request_lookahead in frontend/edge.py).
    # The longest caption the context allows decodes for ~2.5 s here; on a machine
    # loaded by other jobs the front end can be starved for that long, so a lost
    # race gets one more try before it counts as a failure.
    for attempt in range(2):
        with start_long_caption(stack, stream=False, request_id=f"hangup-wait-{attempt}"):
            time.sleep(0.3)
        outcome = broker_outcome(stack, f"hangup-wait-{attempt}")
        if "code=cancelled" in outcome:
            break
    assert "code=cancelled" in outcome, stack.log("broker")[-1000:]


def test_body_just_over_the_limit_gets_a_json_413(stack):
    limit = stack.config.max_body_bytes
    big = {"image_url": "data:image/png;base64," + "A" * limit}
    resp, raw = request(stack, "POST", "/v1/caption", big)
    assert resp.status == 413
    assert json.loads(raw)["error"]["code"] == "payload_too_large"


def test_health_reports_the_stack(stack):
    code, body = stack.health()
    assert code == 200
    assert body["status"] == "ok" and body["ready"] is True
    assert body["auth_required"] is False
    assert body["workers"] == {"preprocess": int(stack.env["PREPROCESS_WORKERS"]), "gpu": 1}
    assert {"name", "revision", "device", "dtype", "test_model"} <= set(body["model"])
    assert body["model"]["test_model"] is True
    assert body["note"] == "random-weight test model: answers are gibberish"
    resp, raw = request(stack, "GET", "/health/live")
    assert resp.status == 200


def test_health_without_a_broker_is_503_and_live_stays_200(stack):
    # Last in this module: it stops the broker (and starts it again).
    stack.supervisorctl("stop", "broker", check=True)
    try:
        code, body = stack.health()
        assert code == 503 and body["status"] == "unavailable" and body["ready"] is False
        assert request(stack, "GET", "/health/live")[0].status == 200
        # A request now fails fast and cleanly instead of hanging.
        resp, raw = request(stack, "POST", "/v1/caption", {"image_url": IMAGE_URL, "settings": GREEDY})
        assert resp.status == 503 and json.loads(raw)["error"]["code"]
    finally:
        stack.supervisorctl("start", "broker", check=True)
    stack.wait_ready(60)
