"""The whole service under supervisord, used through the official `moondream` client.

Uses the `stack` fixture (tests/conftest.py).  Expected answers come from running
the engine in this process on the same input: the client sends each image as a
JPEG (quality 95) data URL, so the expectation decodes those same JPEG bytes the
way the preprocess workers do.
"""
from __future__ import annotations

import concurrent.futures
import functools
import io
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid

import moondream as md
import pytest
from PIL import Image

from gpu_worker.engine_types import EngineRequest, ImageInput
from gpu_worker.scheduler import Scheduler
from preprocess_worker.worker import preprocess
from tests.engine_helpers import CONFORMANCE, fixture_engine, run_requests, sampling, skill_params
from tests.stack import wait_for

pytestmark = pytest.mark.timeout(240)  # a 2-core machine under load needs it; usually ~20-40 s each

SETTINGS = {"temperature": 0, "max_tokens": 16}
REGION_SETTINGS = {**SETTINGS, "max_objects": 4}  # detect/point: few objects keep the test fast


def settings_for(skill: str) -> dict:
    return REGION_SETTINGS if skill in ("detect", "point") else SETTINGS
IMAGES = sorted(os.listdir(os.path.join(CONFORMANCE, "main", "images")))
PHOTO = "photo_773x767.jpg"


@pytest.fixture(scope="module")
def direct():
    """Run one request on the engine in this process: the answer the stack must give."""
    scheduler = Scheduler(fixture_engine("main"), max_batch=1)

    def run(skill: str, params: dict, image_name: str | None):
        settings = settings_for(skill)
        image = engine_image(image_name) if image_name else None
        request = EngineRequest(request_id=uuid.uuid4().hex, skill=skill, params=skill_params(skill, params),
                                settings=sampling(settings), image=image)
        outcome = run_requests(scheduler, [request])[request.request_id]
        assert outcome.error is None, outcome.error
        return outcome

    return run


@functools.lru_cache(maxsize=None)
def pil_image(name: str) -> Image.Image:
    with Image.open(os.path.join(CONFORMANCE, "main", "images", name)) as im:
        return im.convert("RGB")


@functools.lru_cache(maxsize=None)
def engine_image(name: str) -> ImageInput:
    """What the preprocess workers make of the JPEG the moondream client sends."""
    jpeg = io.BytesIO()
    pil_image(name).save(jpeg, format="JPEG", quality=95)  # exactly the client's encoding
    done = preprocess(jpeg.getvalue(), 50_000_000, 16384)
    return ImageInput(crops=done.crops, tiling=done.tiling, key=done.key)


def call_client(model, skill: str, params: dict, image_name: str | None, stream: bool = False) -> dict:
    """One request through HTTP with the official client; streamed text is joined."""
    settings = settings_for(skill)
    image = pil_image(image_name) if image_name else None
    if skill == "caption":
        out = model.caption(image, length=params["length"], stream=stream, settings=settings)
        return {"caption": "".join(out["caption"]) if stream else out["caption"]}
    if skill == "query":
        out = model.query(image, params["question"], stream=stream, settings=settings,
                          reasoning=params.get("reasoning", False), spatial_refs=params.get("spatial_refs"))
        return {**out, "answer": "".join(out["answer"])} if stream else out
    if skill == "detect":
        return model.detect(image, params["object"], settings=settings)
    return model.point(image, params["object"], settings=settings)


def client_for(stack):
    return md.vl(endpoint=f"{stack.url}/v1", api_key=stack.env.get("VLM_API_KEY") or None)


CASES = [
    ("caption", {"length": "short"}, PHOTO),
    ("caption", {"length": "normal"}, PHOTO),
    ("caption", {"length": "long"}, PHOTO),
    ("query", {"question": "What is in the picture?"}, PHOTO),
    ("query", {"question": "Say hello."}, None),
    ("query", {"question": "Why?", "reasoning": True}, PHOTO),
    ("query", {"question": "What is here?", "spatial_refs": [[0.5, 0.5]]}, PHOTO),
    ("detect", {"object": "face"}, PHOTO),
    ("point", {"object": "face"}, PHOTO),
]


def expected_output(outcome, skill: str) -> dict:
    out = dict(outcome.output)
    if skill == "query" and out.get("reasoning") is None:
        out.pop("reasoning", None)
    return out


def test_client_gets_the_engines_answers(stack, direct):
    model = client_for(stack)
    for skill, params, image_name in CASES:
        expected = expected_output(direct(skill, params, image_name), skill)
        streams = (False, True) if skill in ("caption", "query") else (False,)
        for stream in streams:
            got = call_client(model, skill, params, image_name, stream=stream)
            if stream:  # streamed replies carry only the text
                key = "caption" if skill == "caption" else "answer"
                assert got[key] == expected[key], (skill, params, stream)
            else:
                assert got == expected, (skill, params, stream)


def concurrent_requests() -> list:
    """32 different requests over every skill.  Images with few crops (and the photo,
    already encoded by the test above) keep the in-process expectations quick."""
    images = ["small_96x64.png", "square_378.png", "tall_300x1500.png", PHOTO]
    requests = []
    for i, name in enumerate(images):
        requests += [
            ("caption", {"length": "short"}, name),
            ("caption", {"length": "normal"}, name),
            ("caption", {"length": "long"}, name),
            ("query", {"question": f"What do you see, {i}?"}, name),
            ("query", {"question": f"Is anything red in picture {i}?"}, name),
            ("detect", {"object": ("face", "dog", "car", "tree")[i]}, name),
            ("point", {"object": ("hand", "sun", "cat", "door")[i]}, name),
        ]
    requests += [("query", {"question": f"Count to {n}."}, None) for n in range(32 - len(requests))]
    return requests


def test_32_concurrent_clients_get_their_serial_answers(stack, direct):
    requests = concurrent_requests()
    assert len(requests) == 32 and len({json.dumps(r, sort_keys=True) for r in requests}) == 32
    expected = [expected_output(direct(skill, params, image), skill) for skill, params, image in requests]

    def one(i: int) -> dict:
        skill, params, image = requests[i]
        return call_client(client_for(stack), skill, params, image, stream=(i % 4 == 1))

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    for i, (got, want) in enumerate(zip(answers, expected)):
        if i % 4 == 1:  # streamed: text only
            want = {"answer": want["answer"]} if "answer" in want else want
            got = {k: got[k] for k in want}
        assert got == want, (i, requests[i])


def sse_events(url: str, body: dict, first_chunk: threading.Event | None = None) -> list:
    """POST with stream=true and collect the SSE events (dicts) until the stream ends;
    `first_chunk` is set when the first text arrives."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=30) as resp:
        for line in resp:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                if first_chunk is not None and events[-1].get("chunk"):
                    first_chunk.set()
    return events


def test_gpu_worker_killed_mid_stream_then_restarted(stack):
    long_settings = {"temperature": 0, "max_tokens": 1500}  # seconds of decoding, even 4 at a time on a fast machine
    model = client_for(stack)

    def blocking_request(i: int):
        try:
            model.query(None, f"Tell me a long story number {i}.", settings=long_settings)
            return None
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        old_pid = stack.pid("gpu_worker")
        first_chunk = threading.Event()
        stream = pool.submit(sse_events, f"{stack.url}/v1/query",
                             {"question": "Tell me everything.", "settings": long_settings}, first_chunk)
        others = [pool.submit(blocking_request, i) for i in range(3)]
        # kill as soon as all four are on the GPU worker (text only: none is queued) and the stream has begun
        wait_for(lambda: first_chunk.is_set() and stack.health()[1]["queue"]["in_flight"] == 4, 30,
                 "four requests generating", stack)
        os.kill(old_pid, signal.SIGKILL)
        killed_at = time.monotonic()

        events = stream.result(timeout=20)
        assert events and events[-1]["completed"] is True and events[-1]["error"]["status"] == 503, events[-1:]
        assert events[-1]["error"]["code"] == "worker_died"
        assert any(e.get("chunk") for e in events[:-1])  # it was streaming when the worker died
        for other in others:
            code, body = other.result(timeout=20)
            assert code == 503, body
        assert time.monotonic() - killed_at < 10

    # supervisord starts a new GPU worker; requests succeed again.
    wait_for(lambda: stack.pid("gpu_worker") not in (0, old_pid), 30, "a new gpu_worker")
    wait_for(lambda: stack.health()[0] == 200, 30, "/health to be ready again")
    answer = model.query(None, "Are you back?", settings=SETTINGS)
    assert isinstance(answer["answer"], str)
    assert stack.states()["gpu_worker"] in ("RUNNING", "STARTING")
