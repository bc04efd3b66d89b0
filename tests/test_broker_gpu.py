"""The broker with the real GPU worker (tiny test model) and preprocess workers, via BrokerClient."""
from __future__ import annotations

import signal
import time
import uuid

import pytest

from shared.config import EXIT_CONFIG
from shared.protocol import CaptionParams, Chunk, QueryParams, Result, SamplingSettings, Submit
from tests.test_broker import PHOTO, Services, png, services  # noqa: F401  (services is a fixture)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def gpu_services(tmp_path_factory):
    s = Services(tmp_path_factory.mktemp("gpu"), NO_GPU_GRACE=2, BATCH_SIZE=8)
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
    assert isinstance(gpu_services.run(skill="query", params=QueryParams(question="hi?"))[-1], Result)
    bad = gpu_services.run(skill="caption", params=CaptionParams(length="epic"), image=PHOTO)[-1]
    assert (bad.status, bad.code) == (422, "invalid_request")


def test_cancel_frees_the_gpu_worker(gpu_services):
    msg = Submit(request_id="long", skill="query", params=QueryParams(question="go on"), settings=SamplingSettings(temperature=0, max_tokens=1500),
                 stream=True)
    stream = gpu_services.client.submit(msg, None)
    time.sleep(0.3)
    stream.cancel()
    stream.cancel()  # idempotent
    end = time.monotonic() + 5
    while gpu_services.client.status().in_flight and time.monotonic() < end:
        time.sleep(0.05)
    assert gpu_services.client.status().in_flight == 0
    assert isinstance(gpu_services.run(skill="query", params=QueryParams(question="hi?"))[-1], Result)


def test_concurrent_requests_each_get_their_own_answer(gpu_services):
    import concurrent.futures

    questions = [f"question number {i}?" for i in range(8)]
    serial = {q: gpu_services.run(skill="query", params=QueryParams(question=q))[-1].output for q in questions}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda q: gpu_services.run(skill="query", params=QueryParams(question=q))[-1].output, questions))
    assert results == [serial[q] for q in questions]


def test_gpu_worker_killed_mid_request_gives_503(gpu_services):
    s = gpu_services
    msg = Submit(request_id="doomed", skill="query", params=QueryParams(question="go on"), settings=SamplingSettings(temperature=0, max_tokens=1500),
                 stream=True)
    stream = iter(s.client.submit(msg, None))
    first = next(stream)  # generating now; 1500 tokens take seconds more
    assert isinstance(first, Chunk), first
    gpu = next(p for p in s.group.procs if p.args[-1] == "gpu_worker")
    gpu.send_signal(signal.SIGKILL)
    started = time.monotonic()
    events = [first, *stream]
    assert (events[-1].status, events[-1].code) == (503, "worker_died")
    assert time.monotonic() - started < 5


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
    assert gpu.wait(timeout=30) == EXIT_CONFIG  # a setting that cannot work: supervisord leaves it down
    errors = [line for line in gpu.log_path.read_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "model load failed" in errors[0]
    status = s.client.status()
    assert status.gpu_workers == 0
    # The broker heard why (CannotStart), for /health to say so.
    assert "MOONDREAM_MODEL=/nonexistent/model-dir is not a directory" in status.cannot_start["gpu"], status


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
                     params=CaptionParams(length="short") if image else QueryParams(question=f"q{i}"),
                     settings=SamplingSettings(temperature=0, max_tokens=rng.choice([1, 4, 8])), stream=rng.random() < 0.5,
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
        outcomes = collections.Counter(pool.map(one, range(100)))
    assert set(outcomes) <= {("Result", ""), ("Error", "timeout"), ("Error", "invalid_image"), "cancelled"}, outcomes
    assert outcomes[("Result", "")] > 50
    end = time.monotonic() + 5
    while (status := s.client.status()).in_flight and time.monotonic() < end:
        time.sleep(0.05)
    assert (status.in_flight, status.queued) == (0, 0)  # the broker forgot every request


def test_a_gpu_worker_lists_its_variants_when_it_registers(services):
    """/health shows the variants from the first moment the GPU worker counts (its Ready carries them),
    not only after its first heartbeat: heartbeats here are 30 s apart."""
    from tests.engine_helpers import CONFORMANCE, VARIANTS_DIR

    s = services(HEARTBEAT_INTERVAL=30)
    s.start("gpu_worker", MOONDREAM_MODEL=f"{CONFORMANCE}/variants", VARIANT_DIR=VARIANTS_DIR)
    status = s.wait_for(gpu=1, timeout=60)
    assert status.variants["available"] == ["ft-alpha@100", "ft-beta@7"], status.variants


def test_requests_go_to_their_models_workers_and_a_busy_model_blocks_no_other(tmp_path):
    """Two real GPU workers of two models (MOONDREAM_MODELS): each request reaches a worker of its
    model; while the Moondream 2 worker is full, a Moondream 3 request behind its queued ones
    still runs at once; a model with no worker is a 503 after NO_GPU_GRACE."""
    import os

    from tests.engine_helpers import CONFORMANCE

    models = (f"moondream2={os.path.join(CONFORMANCE, 'main')},"
              f"moondream3-preview={os.path.join(CONFORMANCE, 'md3-main')}")
    s = Services(tmp_path, NO_GPU_GRACE=1, MOONDREAM_MODELS=models)
    try:
        s.start("gpu_worker", MOONDREAM_MODEL_INDEX="0", BATCH_SIZE="1")
        s.start("gpu_worker", MOONDREAM_MODEL_INDEX="1", BATCH_SIZE="1")
        status = s.wait_for(gpu=2, timeout=60)
        assert sorted(m["id"] for m in status.models) == ["moondream2", "moondream3-preview"]
        families = {model: s.run(skill="query", params=QueryParams(question="hi?", reasoning=False), model=model)[-1]
                    for model in ("moondream2", "moondream3-preview")}
        assert all(isinstance(r, Result) for r in families.values())
        assert families["moondream2"].output != families["moondream3-preview"].output
        long = Submit(request_id="long", skill="query", params=QueryParams(question="go on", reasoning=False),
                      settings=SamplingSettings(temperature=0, max_tokens=1000), stream=True, model="moondream2")
        long_stream = s.client.submit(long, None)
        next(iter(long_stream))  # the Moondream 2 worker's one slot is taken
        queued = s.client.submit(Submit(request_id="queued", skill="query", params=QueryParams(question="hi?"),
                                        settings=SamplingSettings(max_tokens=3), model="moondream2"), None)
        started = time.monotonic()
        md3 = s.run(skill="query", params=QueryParams(question="hi?", reasoning=False), model="moondream3-preview")[-1]
        assert isinstance(md3, Result) and md3.output == families["moondream3-preview"].output
        assert time.monotonic() - started < 20
        assert s.client.status().queued >= 1  # the second Moondream 2 request still waits
        long_stream.cancel()
        assert isinstance(list(queued)[-1], Result)
        nobody = s.run(skill="query", params=QueryParams(question="hi?"), model="moondream9")[-1]
        assert (nobody.status, nobody.code) == (503, "no_gpu_worker") and "moondream9" in nobody.message
    finally:
        s.close()
