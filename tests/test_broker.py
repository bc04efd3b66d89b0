"""The broker with real worker processes on real sockets, driven through BrokerClient."""
from __future__ import annotations

import io
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

from frontend.broker_client import BrokerClient
from shared import protocol
from shared.protocol import Chunk, Error, Ready, Result, Submit
from tests.stack import REPO, ProcessGroup, config_from_env, stack_env

pytestmark = pytest.mark.timeout(60)

PHOTO = (REPO / "tests/conformance/main/images/photo_773x767.jpg").read_bytes()
SETTINGS = {"temperature": 0, "max_tokens": 16}


class Services:
    """A broker plus whatever workers a test starts, all stopped at the end."""

    def __init__(self, tmp_path: Path, **env):
        self.env = stack_env(tmp_path, **env)
        self.config = config_from_env(self.env)
        self.group = ProcessGroup(self.env, tmp_path)
        self.broker = self.group.start("broker", "broker")
        self.client = BrokerClient(self.config)

    def start(self, module: str, **env):
        return self.group.start(module, **env)

    def wait_for(self, preprocess: int = 0, gpu: int = 0, timeout: float = 30.0) -> protocol.Status:
        end = time.monotonic() + timeout
        status = None
        while time.monotonic() < end:
            status = self.client.status(timeout=0.5)
            if status and status.preprocess_workers == preprocess and status.gpu_workers == gpu:
                return status
            time.sleep(0.05)
        raise AssertionError(f"workers not registered in time: {status}")

    def run(self, skill="caption", params=None, image=None, **submit_fields) -> list:
        msg = Submit(request_id=uuid.uuid4().hex, skill=skill, params=params or {"length": "short"},
                     settings=dict(SETTINGS), has_image=image is not None, **submit_fields)
        return list(self.client.submit(msg, image))

    def broker_log(self, wait_for: str = "", timeout: float = 3.0) -> str:
        """The broker's log so far; with `wait_for`, once it contains that text (it logs after replying)."""
        end = time.monotonic() + timeout
        while True:
            text = self.broker.log_path.read_text(errors="replace")
            if wait_for in text or time.monotonic() > end:
                return text
            time.sleep(0.05)

    def close(self):
        self.client.close()
        self.group.stop_all()


@pytest.fixture
def services(tmp_path):
    created = []

    def make(**env) -> Services:
        s = Services(tmp_path, **env)
        created.append(s)
        return s

    yield make
    for s in created:
        s.close()


def big_jpeg(side: int = 6000) -> bytes:
    """A smooth 36 MP JPEG: small to send, about 2 s to decode and tile."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = ((ramp[None, :] + ramp[:, None]) / 2).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(out, "JPEG", quality=90)
    return out.getvalue()


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def test_status_counts_workers(services):
    s = services()
    status = s.wait_for(preprocess=0)
    assert status.gpu_ready is False and status.broker_id
    s.start("preprocess_worker")
    s.start("preprocess_worker")
    status = s.wait_for(preprocess=2)
    assert (status.gpu_workers, status.gpu_ready, status.model, status.queued, status.in_flight) == (0, False, {}, 0, 0)


def test_image_is_preprocessed_then_waits_for_a_gpu_worker(services):
    s = services(NO_GPU_GRACE=1)
    s.start("preprocess_worker")
    s.wait_for(preprocess=1)
    started = time.monotonic()
    events = s.run(image=PHOTO)
    elapsed = time.monotonic() - started
    assert [type(e) for e in events] == [Error]
    assert (events[0].status, events[0].code) == (503, "no_gpu_worker")
    assert 0.9 < elapsed < 5
    # It went through a preprocess worker first: the request line has a preprocess time.
    line = next(l for l in s.broker_log(events[0].request_id).splitlines() if events[0].request_id in l)
    assert "preprocess_ms=" in line and "code=no_gpu_worker" in line


def test_text_only_request_without_gpu_worker_gets_503(services):
    s = services(NO_GPU_GRACE=0.5)
    s.wait_for()
    started = time.monotonic()
    events = s.run(skill="query", params={"question": "hi?"})
    assert (events[-1].status, events[-1].code) == (503, "no_gpu_worker")
    assert time.monotonic() - started < 5


def test_bad_images_get_4xx_and_the_worker_survives(services):
    s = services(NO_GPU_GRACE=0.3, MAX_IMAGE_PIXELS=100_000)
    worker = s.start("preprocess_worker")
    s.wait_for(preprocess=1)
    cases = {
        b"definitely not an image": (400, "invalid_image"),
        b"II*\x00" + b"\x00" * 64: (415, "unsupported_image_format"),
        png(200, 150)[:-40]: (422, "invalid_image"),  # truncated
        png(400, 400): (413, "image_too_large"),
        png(20000, 4): (413, "image_too_large"),  # few pixels, but a side over MAX_IMAGE_SIDE
    }
    for data, (status, code) in cases.items():
        events = s.run(image=data)
        assert len(events) == 1 and isinstance(events[0], Error)
        assert (events[0].status, events[0].code) == (status, code), events[0]
    assert worker.poll() is None
    # ...and it still preprocesses a good image (which then finds no GPU worker).
    assert s.run(image=png(100, 80))[-1].code == "no_gpu_worker"


def test_killed_preprocess_worker_job_is_retried_on_another(services):
    s = services(NO_GPU_GRACE=0.5)
    first = s.start("preprocess_worker")
    s.wait_for(preprocess=1)
    s.start("preprocess_worker")
    s.wait_for(preprocess=2)
    msg = Submit(request_id="retry-me", skill="caption", params={"length": "short"}, settings=SETTINGS, has_image=True)
    stream = s.client.submit(msg, big_jpeg())
    time.sleep(0.7)  # `first` (idle the longest, so chosen) is decoding it now
    first.send_signal(signal.SIGKILL)
    events = list(stream)
    # Preprocessed by the second worker, then no GPU: 503 no_gpu_worker, not a lost request.
    assert [(e.status, e.code) for e in events] == [(503, "no_gpu_worker")]
    assert "(1 jobs in flight)" in s.broker_log("(1 jobs in flight)")


def test_queue_limit_gives_429(services):
    s = services(MAX_QUEUE=2, NO_GPU_GRACE=1)
    s.wait_for()
    streams = [s.client.submit(Submit(request_id=f"q{i}", skill="caption", params={}, settings={}, has_image=True), PHOTO)
               for i in range(3)]
    third = streams[2].next_event(timeout=5)
    assert (third.status, third.code) == (429, "overloaded")
    # The other two were queued and are answered too (no preprocess worker: 503 after the grace).
    for stream in streams[:2]:
        assert list(stream)[-1].code == "no_preprocess_worker"


def test_deadline_gives_504(services):
    s = services(NO_GPU_GRACE=30)
    s.wait_for()
    events = s.run(skill="query", params={"question": "hi?"}, deadline=time.time() + 0.5)
    assert (events[-1].status, events[-1].code) == (504, "timeout")


def test_malformed_messages_and_wrong_secret_are_dropped(services):
    s = services(WORKER_SECRET="let-me-in")
    s.wait_for()
    ctx = zmq.Context.instance()
    front = ctx.socket(zmq.DEALER)
    front.connect(s.config.broker_frontend_addr)
    back = ctx.socket(zmq.DEALER)
    back.connect(s.config.broker_backend_addr)
    try:
        front.send_multipart([b"\xc1garbage"])
        front.send_multipart([b"a", b"b", b"c"])
        front.send_multipart(protocol.encode(Ready(kind="gpu", worker_id="x")))  # wrong direction
        back.send_multipart([b"\x93\x01\x02"])
        back.send_multipart(protocol.encode(Result(request_id="nope", output={})))  # not registered
        back.send_multipart(protocol.encode(Ready(kind="gpu", worker_id="intruder", secret="wrong")))
        time.sleep(0.3)
        status = s.wait_for(preprocess=0, gpu=0)
        assert s.broker.poll() is None and status.gpu_ready is False
        assert "rejected: wrong secret" in s.broker_log("rejected") and "let-me-in" not in s.broker_log()
        s.start("preprocess_worker")  # inherits the right WORKER_SECRET
        s.wait_for(preprocess=1)
    finally:
        front.close(linger=0)
        back.close(linger=0)


def test_broker_unreachable_ends_stream_with_503(tmp_path):
    env = stack_env(tmp_path, HEARTBEAT_INTERVAL=0.25, HEARTBEAT_LIVENESS=4)
    client = BrokerClient(config_from_env(env))  # nothing listens there
    try:
        started = time.monotonic()
        events = list(client.submit(Submit(request_id="r", skill="query", params={"question": "q"}, settings={}), None))
        assert [(e.status, e.code) for e in events] == [(503, "broker_unavailable")]
        assert time.monotonic() - started < 5
        assert client.status(timeout=0.3) is None
    finally:
        client.close()


def test_broker_dying_mid_request_ends_stream_with_503(services):
    s = services(NO_GPU_GRACE=30)
    s.wait_for()
    stream = s.client.submit(Submit(request_id="r", skill="query", params={"question": "q"}, settings={}), None)
    time.sleep(0.3)
    s.broker.send_signal(signal.SIGKILL)
    started = time.monotonic()
    events = list(stream)
    assert [(e.status, e.code) for e in events] == [(503, "broker_unavailable")]
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- with the real GPU worker (tiny test model)
@pytest.fixture(scope="module")
def gpu_services(tmp_path_factory):
    s = Services(tmp_path_factory.mktemp("gpu"), NO_GPU_GRACE=2)
    s.start("preprocess_worker")
    s.start("gpu_worker")
    s.wait_for(preprocess=1, gpu=1)
    yield s
    s.close()


def test_stream_routes_chunks_then_result(gpu_services):
    events = gpu_services.run(image=PHOTO, stream=True)
    chunks, final = events[:-1], events[-1]
    assert isinstance(final, Result) and all(isinstance(e, Chunk) for e in chunks)
    assert "".join(c.text for c in chunks) == final.output["caption"]
    assert final.metrics["output_tokens"] >= 1
    status = gpu_services.client.status()
    assert status.gpu_ready and status.model["test_model"] is True and status.in_flight == 0


def test_text_only_query_and_invalid_params(gpu_services):
    assert isinstance(gpu_services.run(skill="query", params={"question": "hi?"})[-1], Result)
    bad = gpu_services.run(skill="caption", params={"length": "epic"}, image=PHOTO)[-1]
    assert (bad.status, bad.code) == (422, "invalid_request")


def test_cancel_frees_the_gpu_worker(gpu_services):
    msg = Submit(request_id="long", skill="query", params={"question": "go on"}, settings={"temperature": 0, "max_tokens": 1500},
                 stream=True)
    stream = gpu_services.client.submit(msg, None)
    time.sleep(0.3)
    stream.cancel()
    stream.cancel()  # idempotent
    end = time.monotonic() + 5
    while gpu_services.client.status().in_flight and time.monotonic() < end:
        time.sleep(0.05)
    assert gpu_services.client.status().in_flight == 0
    assert isinstance(gpu_services.run(skill="query", params={"question": "hi?"})[-1], Result)


def test_concurrent_requests_each_get_their_own_answer(gpu_services):
    import concurrent.futures

    questions = [f"question number {i}?" for i in range(8)]
    serial = {q: gpu_services.run(skill="query", params={"question": q})[-1].output for q in questions}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda q: gpu_services.run(skill="query", params={"question": q})[-1].output, questions))
    assert results == [serial[q] for q in questions]


def test_gpu_worker_killed_mid_request_gives_503(gpu_services):
    s = gpu_services
    msg = Submit(request_id="doomed", skill="query", params={"question": "go on"}, settings={"temperature": 0, "max_tokens": 1500},
                 stream=True)
    stream = s.client.submit(msg, None)
    time.sleep(0.5)  # generating now (1500 tokens take seconds)
    gpu = next(p for p in s.group.procs if p.args[-1] == "gpu_worker")
    gpu.send_signal(signal.SIGKILL)
    started = time.monotonic()
    events = list(stream)
    assert (events[-1].status, events[-1].code) == (503, "worker_died")
    assert time.monotonic() - started < 5


def test_json_logs_have_one_line_per_request_without_secrets(services):
    import json

    s = services(LOG_FORMAT="json", NO_GPU_GRACE=0.3, WORKER_SECRET="hush-hush")
    s.start("preprocess_worker")
    s.wait_for(preprocess=1)
    rid = s.run(image=png(64, 64))[-1].request_id
    lines = [json.loads(line) for line in s.broker_log(rid).splitlines() if line.strip()]
    done = [line for line in lines if line.get("event") == "request_done"]
    assert len(done) == 1 and done[0]["request_id"] == rid and done[0]["status"] == 503
    assert done[0]["process"] == "broker" and done[0]["total_ms"] >= done[0]["preprocess_ms"] > 0
    assert "hush-hush" not in s.broker_log()


def test_workers_and_clients_rejoin_a_restarted_broker(services):
    s = services()
    s.start("preprocess_worker")
    s.start("gpu_worker")
    first_id = s.wait_for(preprocess=1, gpu=1).broker_id
    s.broker.send_signal(signal.SIGKILL)
    s.broker.wait()
    s.broker = s.group.start("broker", "broker-2")
    # The workers notice the silence, reconnect and register again; the client just reconnects.
    status = s.wait_for(preprocess=1, gpu=1, timeout=20)
    assert status.broker_id != first_id
    assert isinstance(s.run(image=png(64, 48))[-1], Result)


def test_gpu_worker_with_a_missing_model_exits_with_one_line(services):
    s = services()
    gpu = s.start("gpu_worker", MOONDREAM_MODEL="/nonexistent/model-dir")
    assert gpu.wait(timeout=30) != 0
    errors = [line for line in gpu.log_path.read_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "model load failed" in errors[0]
    assert s.client.status().gpu_workers == 0


def test_every_request_gets_exactly_one_final_reply_under_a_mixed_load(services):
    """Images, bad images, text, streams, cancels and short deadlines, 24 at a time."""
    import collections
    import concurrent.futures
    import random

    s = services(BATCH_SIZE=8)
    s.start("preprocess_worker")
    s.start("preprocess_worker")
    s.start("gpu_worker")
    s.wait_for(preprocess=2, gpu=1)
    small = png(50, 40)

    def one(i: int):
        rng = random.Random(i)
        pick = rng.random()
        image = small if pick < 0.4 else (b"junk" if pick < 0.5 else None)
        msg = Submit(request_id=uuid.uuid4().hex, skill="caption" if image else "query",
                     params={"length": "short"} if image else {"question": f"q{i}"},
                     settings={"temperature": 0, "max_tokens": rng.choice([1, 4, 8])}, stream=rng.random() < 0.5,
                     has_image=image is not None, deadline=time.time() + 0.2 if rng.random() < 0.1 else 0.0)
        stream = s.client.submit(msg, image)
        if rng.random() < 0.1:
            time.sleep(0.05)
            stream.cancel()
            return "cancelled"
        events = list(stream)
        finals = [e for e in events if not isinstance(e, Chunk)]
        assert len(finals) == 1 and events[-1] is finals[0], events
        return type(finals[0]).__name__, getattr(finals[0], "code", "")

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        outcomes = collections.Counter(pool.map(one, range(150)))
    assert set(outcomes) <= {("Result", ""), ("Error", "timeout"), ("Error", "invalid_image"), "cancelled"}, outcomes
    assert outcomes[("Result", "")] > 80
    end = time.monotonic() + 5
    while (status := s.client.status()).in_flight and time.monotonic() < end:
        time.sleep(0.05)
    assert (status.in_flight, status.queued) == (0, 0)  # the broker forgot every request
