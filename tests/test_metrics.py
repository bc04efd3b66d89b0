"""GET /metrics after real traffic through the whole stack (tiny model on the CPU)."""
from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.broker import _sum_counters
from frontend.metrics import BrokerCollector
from shared import protocol
from shared.step_times import STEP_BUCKETS, StepTimes
from tests.frontend_helpers import SMALL_IMAGE, warm_up

pytestmark = pytest.mark.timeout(240)

IMAGE_URL = "data:image/png;base64," + base64.b64encode(SMALL_IMAGE.read_bytes()).decode()
FEW = {"temperature": 0, "max_tokens": 6}


def post(stack, path: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(stack.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def scrape(stack) -> dict:
    """(name, labels as a sorted tuple) -> value, for every sample."""
    with urllib.request.urlopen(stack.url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    assert ":" not in "".join(line.split()[0] for line in text.splitlines() if line and not line.startswith("#"))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def warm(stack):
    warm_up(stack)
    return stack


def test_traffic_moves_counters_and_histograms(warm):
    stack = warm
    before = scrape(stack)

    # The same image twice: the second is an image-cache hit.
    answers = []
    for _ in range(2):
        status, body = post(stack, "/v1/caption", {"image_url": IMAGE_URL, "settings": FEW})
        assert status == 200, body
        answers.append(json.loads(body))
    status, body = post(stack, "/v1/query", {"question": "Why?", "stream": True, "settings": FEW})
    assert status == 200, body
    events = [json.loads(line[len(b"data: "):]) for line in body.splitlines() if line.startswith(b"data: ")]
    chunks = [e for e in events if not e["completed"]]
    final = events[-1]
    assert final["completed"] and "metrics" in final
    assert post(stack, "/v1/caption", {"image_url": IMAGE_URL, "length": "huge"})[0] == 422
    assert post(stack, "/no/such/route", {})[0] == 404
    urllib.request.urlopen(stack.url + "/static/app.js", timeout=10).read()

    # A stream's latency is recorded when the server closes it, just after the last byte.
    end = time.monotonic() + 5
    while True:
        after = scrape(stack)
        if delta(before, after, "moondream_http_request_duration_seconds_count", route="/v1/query") >= 1 or time.monotonic() > end:
            break
        time.sleep(0.1)

    requests = "moondream_http_requests_total"
    assert delta(before, after, requests, route="/v1/caption", method="POST", status="200") == 2
    assert delta(before, after, requests, route="/v1/caption", method="POST", status="422") == 1
    assert delta(before, after, requests, route="/v1/query", method="POST", status="200") == 1
    assert delta(before, after, requests, route="unmatched", method="POST", status="404") == 1
    assert delta(before, after, requests, route="/static", method="GET", status="200") == 1  # one label for all files

    latency = "moondream_http_request_duration_seconds"
    assert delta(before, after, latency + "_count", route="/v1/caption") == 3  # the 422 too
    assert delta(before, after, latency + "_count", route="/v1/query") == 1
    assert delta(before, after, latency + "_sum", route="/v1/caption") > 0
    assert delta(before, after, latency + "_bucket", route="/v1/caption", le="+Inf") == 3

    # Stream timing, as the front end saw the chunks arrive.
    assert delta(before, after, "moondream_time_to_first_token_seconds_count", skill="query") == 1
    assert delta(before, after, "moondream_inter_token_latency_seconds_count", skill="query") == len(chunks) - 1

    # Numbers from Result.metrics.
    caption_out = sum(a["metrics"]["output_tokens"] for a in answers)
    assert delta(before, after, "moondream_output_tokens_total", skill="caption") == caption_out
    assert delta(before, after, "moondream_output_tokens_total", skill="query") == final["metrics"]["output_tokens"]
    assert delta(before, after, "moondream_prompt_tokens_total", skill="caption") == sum(
        a["metrics"]["input_tokens"] for a in answers)
    assert delta(before, after, "moondream_queue_time_seconds_count", skill="caption") == 2
    assert delta(before, after, "moondream_image_cache_lookups_total") == 2
    assert delta(before, after, "moondream_image_cache_hits_total") >= 1  # the warm-up may have encoded it already
    assert delta(before, after, "moondream_results_total", skill="caption", outcome=answers[0]["finish_reason"]) >= 1

    # Collected from the broker at scrape time.
    assert value(after, "moondream_broker_up") == 1
    assert value(after, "moondream_workers", kind="preprocess") == 2
    assert value(after, "moondream_workers", kind="gpu") == 1
    assert value(after, "moondream_gpu_ready") == 1
    assert value(after, "moondream_queue_depth") == 0
    assert ("moondream_requests_in_flight", ()) in after


def test_gpu_step_times_are_a_histogram_after_real_requests(warm):
    """Every scheduler step the GPU worker ran is in moondream_gpu_step_seconds (from its heartbeats)."""
    stack = warm
    before = scrape(stack)
    status, body = post(stack, "/v1/caption", {"image_url": IMAGE_URL, "settings": FEW})
    assert status == 200, body
    output_tokens = json.loads(body)["metrics"]["output_tokens"]
    steps = "moondream_gpu_step_seconds"
    end = time.monotonic() + 10  # the next heartbeat (every 0.5 s here) carries the new counts
    while True:
        after = scrape(stack)
        # one heartbeat carries both counts (one taken inside a step may be one apart)
        settled = value(after, steps + "_count") == value(after, "moondream_gpu_steps_total")
        if (settled and delta(before, after, "moondream_gpu_steps_total") >= output_tokens) or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert delta(before, after, steps + "_count") >= output_tokens >= 1  # a step per token at least
    assert value(after, steps + "_count") == value(after, "moondream_gpu_steps_total")  # every step counted is timed
    assert value(after, steps + "_bucket", le="+Inf") == value(after, steps + "_count")
    assert delta(before, after, steps + "_sum") > 0
    bounds = [f"{bound:g}" for bound in STEP_BUCKETS]
    counts = [value(after, steps + "_bucket", le=bound) for bound in bounds]
    assert counts == sorted(counts)  # cumulative


def test_step_time_buckets_add_up_over_workers():
    """Two GPU workers' step times, summed by the broker as it sums any counter, read as one histogram."""
    first, second = StepTimes(), StepTimes()
    for seconds in (0.0004, 0.003, 0.2):
        first.observe(seconds)
    second.observe(0.2)
    second.observe(100.0)  # a stalled step: beyond the largest bucket

    class Client:  # stands in for the BrokerClient: only status() is used
        def status(self, timeout):
            return protocol.Status("s", 2, 2, True, gpu_stats=_sum_counters([first.as_stats(), second.as_stats()]))

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in BrokerCollector(Client()).collect() for s in family.samples}
    bucket = "moondream_gpu_step_seconds_bucket"
    assert samples[(bucket, (("le", "0.001"),))] == 1
    assert samples[(bucket, (("le", "0.005"),))] == 2
    assert samples[(bucket, (("le", "0.25"),))] == 4
    assert samples[(bucket, (("le", "30"),))] == 4
    assert samples[(bucket, (("le", "+Inf"),))] == 5
    assert samples[("moondream_gpu_step_seconds_count", ())] == 5
    assert samples[("moondream_gpu_step_seconds_sum", ())] == pytest.approx(100.4034)


def test_status_slots_gpu_stats_and_restarts_are_exported():
    """Every Status field about the GPU workers becomes a metric (only listed gpu_stats keys)."""

    class Client:  # stands in for the BrokerClient: only status() is used
        def status(self, timeout):
            return protocol.Status("s", 2, 1, True, queued=3, gpu_slots=8, gpu_free_slots=5,
                                   gpu_stats={"running": 4, "last_batch": 4, "steps": 10, "free_slots": 5,
                                              "unknown": 1},
                                   worker_restarts={"gpu": 1})

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in BrokerCollector(Client()).collect() for s in family.samples}
    assert samples[("moondream_queue_depth", ())] == 3
    assert samples[("moondream_gpu_free_slots", ())] == 5
    assert samples[("moondream_gpu_slots", ())] == 8
    assert samples[("moondream_gpu_running_sequences", ())] == 4
    assert samples[("moondream_gpu_batch_size", ())] == 4
    assert samples[("moondream_gpu_steps_total", ())] == 10
    assert samples[("moondream_worker_restarts_total", (("kind", "gpu"),))] == 1
    assert not any("unknown" in name for name, _ in samples)


def test_scrape_without_a_broker_says_so_quickly(warm):
    stack = warm
    stack.supervisorctl("stop", "broker", check=True)
    try:
        started = time.monotonic()
        samples = scrape(stack)
        assert time.monotonic() - started < 5
        assert value(samples, "moondream_broker_up") == 0
        assert ("moondream_workers", (("kind", "gpu"),)) not in samples
        assert ("moondream_http_requests_total", (("method", "POST"), ("route", "/v1/caption"), ("status", "200"))) in samples
    finally:
        stack.supervisorctl("start", "broker")
