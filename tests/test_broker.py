"""The broker with real worker processes on real sockets, driven through BrokerClient."""
from __future__ import annotations

import io
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

from broker_client.client import BrokerClient
from shared import protocol
from shared.config import EXIT_CONFIG
from shared.protocol import CaptionParams, Error, QueryParams, Ready, Refused, Result, SamplingSettings, Submit
from tests.stack import REPO, ProcessGroup, config_from_env, stack_env, wait_for

pytestmark = pytest.mark.timeout(60)

PHOTO = (REPO / "tests/conformance/main/images/photo_773x767.jpg").read_bytes()
SETTINGS = SamplingSettings(temperature=0, max_tokens=16)


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

    def wait_until(self, what: str, timeout: float = 10.0, **counts) -> None:
        """Until the broker's Status shows these counts (e.g. queued=1): the request is where the
        test needs it, seen from the broker rather than guessed by a sleep."""
        wait_for(lambda: (status := self.client.status(timeout=0.5)) is not None
                 and all(getattr(status, name) == value for name, value in counts.items()), timeout, what)

    def run(self, skill="caption", params=None, image=None, **submit_fields) -> list:
        msg = Submit(request_id=uuid.uuid4().hex, skill=skill, params=params or CaptionParams(length="short"),
                     settings=SETTINGS, has_image=image is not None, **submit_fields)
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
    events = s.run(skill="query", params=QueryParams(question="hi?"))
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
    msg = Submit(request_id="retry-me", skill="caption", params=CaptionParams(length="short"), settings=SETTINGS, has_image=True)
    stream = s.client.submit(msg, big_jpeg())
    s.wait_until("the job at a preprocess worker", queued=0, in_flight=1)  # at `first`: idle the longest, so chosen
    first.send_signal(signal.SIGKILL)
    events = list(stream)
    # Preprocessed by the second worker, then no GPU: 503 no_gpu_worker, not a lost request.
    assert [(e.status, e.code) for e in events] == [(503, "no_gpu_worker")]
    assert "(1 jobs in flight)" in s.broker_log("(1 jobs in flight)")


def test_queue_limit_gives_429(services):
    s = services(MAX_QUEUE=2, NO_GPU_GRACE=1)
    s.wait_for()
    streams = [s.client.submit(Submit(request_id=f"q{i}", skill="caption", params=CaptionParams(), has_image=True), PHOTO)
               for i in range(3)]
    third = streams[2].next_event(timeout=5)
    assert (third.status, third.code) == (429, "overloaded")
    # The other two were queued and are answered too (no preprocess worker: 503 after the grace).
    for stream in streams[:2]:
        assert list(stream)[-1].code == "no_preprocess_worker"


def test_deadline_gives_504(services):
    s = services(NO_GPU_GRACE=30)
    s.wait_for()
    events = s.run(skill="query", params=QueryParams(question="hi?"), deadline=time.time() + 0.5)
    assert (events[-1].status, events[-1].code) == (504, "timeout")


def test_malformed_messages_and_another_deployment_are_refused(services):
    s = services(DEPLOYMENT_ID="stack-a")
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
        back.send_multipart(protocol.encode(Ready(kind="gpu", worker_id="intruder", deployment="stack-b")))
        replies = []  # RegisterAgain for the unregistered Result, then the answer to the Ready
        while not any(isinstance(r, Refused) for r in replies) and back.poll(5000):
            replies.append(protocol.decode(back.recv_multipart())[0])
        refused = replies[-1]
        assert isinstance(refused, Refused) and "stack-b" in refused.reason, replies
        status = s.wait_for(preprocess=0, gpu=0)
        assert s.broker.poll() is None and status.gpu_ready is False
        assert "'intruder' (gpu) refused" in s.broker_log("refused")
        stranger = s.start("preprocess_worker", DEPLOYMENT_ID="stack-b")
        assert stranger.wait(timeout=20) == EXIT_CONFIG  # and says why, in one line
        assert "refused this worker: this broker belongs to deployment 'stack-a'" in stranger.log_path.read_text()
        s.start("preprocess_worker")  # inherits the right DEPLOYMENT_ID
        s.wait_for(preprocess=1)
    finally:
        front.close(linger=0)
        back.close(linger=0)


def test_broker_unreachable_ends_stream_with_503(tmp_path):
    env = stack_env(tmp_path, HEARTBEAT_INTERVAL=0.25, HEARTBEAT_LIVENESS=4)
    client = BrokerClient(config_from_env(env))  # nothing listens there
    try:
        started = time.monotonic()
        events = list(client.submit(Submit(request_id="r", skill="query", params=QueryParams(question="q")), None))
        assert [(e.status, e.code) for e in events] == [(503, "broker_unavailable")]
        assert time.monotonic() - started < 5
        assert client.status(timeout=0.3) is None
    finally:
        client.close()


def test_broker_dying_mid_request_ends_stream_with_503(services):
    s = services(NO_GPU_GRACE=30)
    s.wait_for()
    stream = s.client.submit(Submit(request_id="r", skill="query", params=QueryParams(question="q")), None)
    s.wait_until("the request queued at the broker", queued=1)
    s.broker.send_signal(signal.SIGKILL)
    started = time.monotonic()
    events = list(stream)
    assert [(e.status, e.code) for e in events] == [(503, "broker_unavailable")]
    assert time.monotonic() - started < 5


def test_json_logs_have_one_line_per_request_without_secrets(services):
    import json

    s = services(LOG_FORMAT="json", NO_GPU_GRACE=0.3, VLM_API_KEY="hush-hush")
    s.start("preprocess_worker")
    s.wait_for(preprocess=1)
    rid = s.run(image=png(64, 64))[-1].request_id
    lines = [json.loads(line) for line in s.broker_log(rid).splitlines() if line.strip()]
    done = [line for line in lines if line.get("event") == "request_done"]
    assert len(done) == 1 and done[0]["request_id"] == rid and done[0]["status"] == 503
    assert done[0]["process"] == "broker" and done[0]["total_ms"] >= done[0]["preprocess_ms"] > 0
    assert "hush-hush" not in s.broker_log()


def test_preprocess_worker_stuck_past_its_time_limit_exits_and_the_job_is_taken_back(services):
    s = services(PREPROCESS_TIMEOUT=0.3, NO_GPU_GRACE=0.5)
    worker = s.start("preprocess_worker")
    s.wait_for(preprocess=1)
    events = list(s.client.submit(Submit(request_id="slow", skill="caption", params=CaptionParams(), has_image=True), big_jpeg()))
    assert worker.wait(timeout=10) == 3  # supervisord would start a fresh one
    # Taken back into the queue; with no worker left it ends with a 503 instead of hanging.
    assert [(e.status, e.code) for e in events] == [(503, "no_preprocess_worker")]


def test_a_worker_stopped_on_purpose_is_logged_as_leaving_not_lost(services):
    s = services()
    worker = s.start("preprocess_worker")
    s.wait_for(preprocess=1)
    worker.terminate()  # what `supervisorctl stop` sends
    assert worker.wait(timeout=10) == 0
    status = s.wait_for(preprocess=0)  # at once: no heartbeat expiry to wait for
    assert "preprocess worker preprocess-" in s.broker_log("left (stopped on purpose)")
    assert "removed" not in s.broker_log() and status.worker_restarts.get("preprocess") == 0
