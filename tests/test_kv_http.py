"""Over HTTP, with a KV pool of KV_CACHE_GB=0.03 (about 10,000 of the tiny model's positions):
32 questions at once on one image run together, because the 730-position image prefix is
held once and referenced, and each answers exactly as it does alone."""
from __future__ import annotations

import concurrent.futures
import uuid

import pytest
import requests

from gpu_worker.engine_types import EngineRequest
from gpu_worker.model import kv_bytes_per_position
from gpu_worker.scheduler import Scheduler
from shared.protocol import QueryParams
from tests.engine_helpers import fixture_engine, run_requests, sampling
from tests.stack import running_stack
from tests.test_stack_e2e import PHOTO, engine_image, pil_image

pytestmark = pytest.mark.timeout(300)

POOL_BYTES = 30_000_000
SETTINGS = {"temperature": 0, "max_tokens": 120}
QUESTIONS = [f"What is thing number {i} in this picture?" for i in range(32)]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_32_questions_on_one_image_share_its_prefix_in_a_small_pool():
    engine = fixture_engine("main")
    assert 9_000 <= POOL_BYTES // kv_bytes_per_position(engine.config, engine.kv_dtype) <= 11_000
    # 32 slots of the full context would need 65,568 positions; 32 copies of the prefix alone 23,360
    # each question asked alone: one row at a time (the image encoded once, then from the cache)
    reqs = [EngineRequest(uuid.uuid4().hex, "query", QueryParams(question=q), sampling(SETTINGS), engine_image(PHOTO))
            for q in QUESTIONS]
    outcomes = run_requests(Scheduler(engine, max_batch=1), reqs)
    alone = [outcomes[req.request_id].output["answer"] for req in reqs]

    import base64
    import io

    jpeg = io.BytesIO()
    pil_image(PHOTO).save(jpeg, format="JPEG", quality=95)  # what tests.test_stack_e2e's engine_image expects
    image_url = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()
    with running_stack(KV_CACHE_GB=POOL_BYTES / 1e9) as stack:
        def ask(question: str) -> dict:
            body = {"image_url": image_url, "question": question, "settings": SETTINGS}
            resp = requests.post(stack.url + "/v1/query", json=body, timeout=240)
            assert resp.status_code == 200, resp.text
            return resp.json()

        requests.post(stack.url + "/v1/query", json={"image_url": image_url, "question": "warm up", "settings":
                      {"temperature": 0, "max_tokens": 1}}, timeout=120).raise_for_status()  # image in the cache
        with concurrent.futures.ThreadPoolExecutor(32) as threads:
            answers = list(threads.map(ask, QUESTIONS))
        assert [a["answer"] for a in answers] == alone

        health = stack.health()[1]
        text = requests.get(stack.url + "/metrics", timeout=10).text
    assert metric(text, "moondream_gpu_running_sequences_peak") >= 16
    total = metric(text, "moondream_kv_bytes_total")
    assert 0 < total <= POOL_BYTES
    assert metric(text, "moondream_kv_bytes_used_peak") <= total
    assert 0 < metric(text, "moondream_kv_bytes_shared") <= metric(text, "moondream_kv_bytes_used")  # the cached image
    assert health["kv_cache"]["bytes_total"] == total and health["kv_cache"]["waiting_for_blocks"] == 0
