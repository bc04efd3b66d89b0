"""GET /metrics: Prometheus metrics of the front end and, at scrape time, the broker.

Three sources:

* `MetricsMiddleware` counts every HTTP request by route and status and times
  it end to end (for a stream: until its last event was written).
* `MeteredClient` wraps the BrokerClient and watches each request's events as
  the front end receives them: time to the first streamed chunk, time between
  chunks, and the numbers in Result.metrics (tokens, queue time and image-cache
  hits from the GPU worker, preprocess time added by the broker).
* `BrokerCollector` asks the broker for its Status on every scrape: worker
  counts, queue depth (what an autoscaler should follow), requests in flight,
  KV slots, the GPU workers' scheduler counters and worker restarts.

Every app gets its own CollectorRegistry, so several apps in one process (tests)
do not share counts.

Several front-end processes on one port (FRONTEND_WORKERS): a scrape reaches whichever one the
kernel picks, so each must report all of them.  supervisord.conf gives them
PROMETHEUS_MULTIPROC_DIR, prometheus_client's multiprocess mode: each process keeps its counts
in files there, and a scrape sums the files of every process, those of processes gone included
(a killed front end's counts do not drop out of the totals).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from shared import protocol
from shared.step_times import cumulative_buckets

# Generation takes seconds to minutes: the default buckets (up to 10 s) are too short.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)

# Requests that matched no route share one label, so scanners cannot add label values.
UNMATCHED_ROUTE = "unmatched"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Status fields about KV slots -> (metric name, help, type).
SLOT_STATUS = {
    "gpu_free_slots": ("moondream_gpu_free_slots", "KV-cache slots free for new sequences, all GPU workers", "gauge"),
    "gpu_slots": ("moondream_gpu_slots", "KV-cache slots in all, all GPU workers", "gauge"),
}
# Keys of Status.gpu_stats (the GPU workers' Scheduler.stats(), summed) -> (metric
# name, help, type).  Keys not listed here are not exported.
GPU_STATS = {
    "running": ("moondream_gpu_running_sequences", "Sequences decoding", "gauge"),
    "waiting": ("moondream_gpu_waiting_sequences", "Sequences admitted to a GPU worker, waiting for a row or KV blocks", "gauge"),
    "waiting_for_blocks": ("moondream_gpu_waiting_for_blocks", "Sequences queued in GPU workers because KV blocks, not rows, ran out", "gauge"),
    "kv_bytes_total": ("moondream_kv_bytes_total", "Bytes of the KV block pools", "gauge"),
    "running_peak": ("moondream_gpu_running_sequences_peak", "Most sequences decoding at once since the workers started", "gauge"),
    "kv_bytes_used_peak": ("moondream_kv_bytes_used_peak", "Most bytes of KV blocks in use at once since the workers started", "gauge"),
    "kv_bytes_used": ("moondream_kv_bytes_used", "Bytes of KV blocks in use (sequences and encoded images)", "gauge"),
    "kv_bytes_shared": ("moondream_kv_bytes_shared", "Bytes of KV blocks referenced by more than one sequence or held by the image cache", "gauge"),
    "kv_blocks_total": ("moondream_kv_blocks", "KV blocks in the pools", "gauge"),
    "kv_blocks_free": ("moondream_kv_blocks_free", "KV blocks free", "gauge"),
    "last_batch": ("moondream_gpu_batch_size", "Sequences in the last decode step", "gauge"),
    "free_slots": ("moondream_gpu_free_slots", "KV-cache slots free", "gauge"),
    "image_cache_entries": ("moondream_image_cache_entries", "Encoded images in the GPU worker's cache", "gauge"),
    "image_cache_bytes": ("moondream_image_cache_bytes", "Bytes held by the encoded-image cache", "gauge"),
    "image_encodes": ("moondream_image_encodes_total", "Images run through the vision encoder", "counter"),
    "steps": ("moondream_gpu_steps_total", "Scheduler steps run", "counter"),
    "variants_loaded": ("moondream_variants_loaded", "Fine-tuned variant adapters loaded", "gauge"),
    "variant_bytes": ("moondream_variant_bytes", "Bytes held by loaded variant adapters", "gauge"),
    "variant_loads": ("moondream_variant_loads_total", "Variant adapters loaded from files", "counter"),
    "variant_evictions": ("moondream_variant_evictions_total", "Variant adapters evicted (LRU)", "counter"),
}


def _family(name: str, help_text: str, kind: str, labels=()):
    if kind == "counter":  # prometheus_client appends _total itself
        return CounterMetricFamily(name.removesuffix("_total"), help_text, labels=labels)
    return GaugeMetricFamily(name, help_text, labels=labels)


class FrontendMetrics:
    """The metrics one app records, in its own registry."""

    def __init__(self, client=None, shared_dir: str = ""):
        if shared_dir:  # the files of this process's values are made as the metrics below are
            os.makedirs(shared_dir, mode=0o700, exist_ok=True)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("moondream_http_requests_total", "HTTP requests answered, by route and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("moondream_http_request_duration_seconds",
                                 "Time from request to the end of the answer (last event of a stream)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("moondream_time_to_first_token_seconds",
                              "Time from submitting a streamed request to its first text chunk",
                              ["skill"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moondream_inter_token_latency_seconds",
                             "Time between consecutive text chunks of a streamed request (a chunk is the text up to "
                             "a space or newline: often one word, so usually more than one token)",
                             ["skill"], buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.queue_time = Histogram("moondream_queue_time_seconds",
                                    "Time a request waited in the GPU worker before its prefill (Result.metrics)",
                                    ["skill"], buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess_time = Histogram("moondream_preprocess_time_seconds",
                                         "Image decoding and tiling time (Result.metrics, when reported)",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("moondream_prompt_tokens_total", "Prompt tokens (image positions included)",
                                     ["skill"], registry=r)
        self.output_tokens = Counter("moondream_output_tokens_total", "Generated tokens", ["skill"], registry=r)
        self.image_lookups = Counter("moondream_image_cache_lookups_total",
                                     "Finished requests with an image (denominator of the hit ratio)", registry=r)
        self.image_hits = Counter("moondream_image_cache_hits_total",
                                  "Finished requests whose image was already encoded", registry=r)
        self.results = Counter("moondream_results_total", "Requests finished by the broker, by skill and outcome",
                               ["skill", "outcome"], registry=r)
        # Counted only for answered requests, so the label values are the base model and
        # variants that really loaded: a client cannot grow the series with made-up ids.
        self.model_requests = Counter("moondream_model_requests_total",
                                      "Requests answered (2xx), by model: the base model or <model>/<variant>",
                                      ["model"], registry=r)
        self.scrape_registry = r  # what /metrics shows
        if shared_dir:  # every front end's counts, from the files (prometheus_client reads the same directory)
            self.scrape_registry = CollectorRegistry()
            MultiProcessCollector(self.scrape_registry, path=shared_dir)
        if client is not None:
            self.scrape_registry.register(BrokerCollector(client))

    def render(self) -> bytes:
        return generate_latest(self.scrape_registry)

    def observe_result(self, skill: str, has_image: bool, result: protocol.Result) -> None:
        m = result.metrics
        self.results.labels(skill, result.finish_reason or "ok").inc()
        if "input_tokens" in m:
            self.prompt_tokens.labels(skill).inc(m["input_tokens"])
        if "output_tokens" in m:
            self.output_tokens.labels(skill).inc(m["output_tokens"])
        if "queue_time_ms" in m:
            self.queue_time.labels(skill).observe(m["queue_time_ms"] / 1000)
        if "preprocess_time_ms" in m:  # added by the broker for requests with an image
            self.preprocess_time.observe(m["preprocess_time_ms"] / 1000)
        if has_image and "image_cache_hit" in m:
            self.image_lookups.inc()
            if m["image_cache_hit"]:
                self.image_hits.inc()


# ---------------------------------------------------------------- HTTP side
class _TimedBody:
    """Wraps a streamed body to time the request until its end (close() is
    called by the WSGI server whether the stream finished or not)."""

    def __init__(self, body, on_close):
        self._body = body
        self._iter = iter(body)
        self._on_close = on_close

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._iter)

    def close(self) -> None:
        try:
            if hasattr(self._body, "close"):
                self._body.close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


class MetricsMiddleware:
    """Counts and times every request.  Put it first: it then sees the final
    status that the error handlers set."""

    def __init__(self, metrics: FrontendMetrics):
        self._m = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_started = time.monotonic()

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        route = self._route(req, resource)
        started = getattr(req.context, "metrics_started", time.monotonic())
        method = req.method if req.method in KNOWN_METHODS else "other"  # clients choose the method too
        self._m.requests.labels(route, method, str(resp.status_code)).inc()
        model = getattr(req.context, "model_id", None)  # set by routes that run the model
        if model is not None and resp.status_code < 300:
            self._m.model_requests.labels(model).inc()

        def done() -> None:
            self._m.latency.labels(route).observe(time.monotonic() - started)

        if resp.stream is not None and not hasattr(resp.stream, "read"):
            resp.stream = _TimedBody(resp.stream, done)
        else:
            done()

    @staticmethod
    def _route(req: falcon.Request, resource) -> str:
        """The route's template, never the raw path: label values must stay few."""
        if resource is not None and req.uri_template:
            return req.uri_template
        if req.path.startswith("/static/") and resource is None:  # static files have no template
            return "/static"
        return UNMATCHED_ROUTE


class MetricsResource:
    """GET /metrics"""

    def __init__(self, metrics: FrontendMetrics):
        self._m = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = self._m.render()


# ---------------------------------------------------------------- broker side
class _MeteredStream:
    """A ReplyStream that reports the timing of its events."""

    def __init__(self, stream, metrics: FrontendMetrics, submit: protocol.Submit):
        self._stream = stream
        self._m = metrics
        self._skill = submit.skill
        self._has_image = submit.has_image
        self._streaming = submit.stream
        self._last = time.monotonic()  # submit time, then the last chunk's
        self._chunks = 0
        self.request_id = stream.request_id

    def next_event(self, timeout: float):
        event = self._stream.next_event(timeout)
        now = time.monotonic()
        if isinstance(event, protocol.Chunk) and self._streaming:
            # Only streamed requests: their chunks leave the GPU worker as soon as they exist.
            (self._m.itl if self._chunks else self._m.ttft).labels(self._skill).observe(now - self._last)
            self._chunks += 1
            self._last = now
        elif isinstance(event, protocol.Result):
            self._m.observe_result(self._skill, self._has_image, event)
        elif isinstance(event, protocol.Error):
            self._m.results.labels(self._skill, event.code).inc()
        return event

    def cancel(self) -> None:
        self._stream.cancel()


class MeteredClient:
    """A BrokerClient look-alike that meters each request's events."""

    def __init__(self, client, metrics: FrontendMetrics):
        self._client = client
        self._m = metrics

    def submit(self, msg: protocol.Submit, image: Optional[bytes] = None) -> _MeteredStream:
        return _MeteredStream(self._client.submit(msg, image), self._m, msg)

    def __getattr__(self, name):  # status(), close(), config...
        return getattr(self._client, name)


class BrokerCollector:
    """Reads the broker's Status at scrape time (a round trip of about a millisecond)."""

    def __init__(self, client, timeout: float = 1.0):
        self._client = client
        self._timeout = timeout

    def describe(self):
        return []  # unknown until the broker answers; keeps registration from scraping

    def collect(self):
        status = self._client.status(timeout=self._timeout)
        up = GaugeMetricFamily("moondream_broker_up", "1 when the broker answered this scrape")
        up.add_metric([], 0 if status is None else 1)
        yield up
        if status is None:
            return
        workers = GaugeMetricFamily("moondream_workers", "Workers registered with the broker", labels=["kind"])
        workers.add_metric(["preprocess"], status.preprocess_workers)
        workers.add_metric(["gpu"], status.gpu_workers)
        yield workers
        ready = GaugeMetricFamily("moondream_gpu_ready", "1 when a GPU worker is ready")
        ready.add_metric([], int(status.gpu_ready))
        yield ready
        # The autoscaling signal: requests accepted but not yet on a worker.
        queued = GaugeMetricFamily("moondream_queue_depth", "Requests waiting in the broker for a worker")
        queued.add_metric([], status.queued)
        yield queued
        in_flight = GaugeMetricFamily("moondream_requests_in_flight", "Requests on a worker (decoding or generating)")
        in_flight.add_metric([], status.in_flight)
        yield in_flight
        yield from self._gpu_workers(status)

    @staticmethod
    def _gpu_workers(status):
        seen = set()
        for field, (name, help_text, kind) in SLOT_STATUS.items():
            family = _family(name, help_text, kind)
            family.add_metric([], getattr(status, field))
            seen.add(name)
            yield family
        for key, value in status.gpu_stats.items():
            # gpu_stats' free_slots is the same number as Status.gpu_free_slots: exported once
            if key in GPU_STATS and isinstance(value, (int, float)) and GPU_STATS[key][0] not in seen:
                name, help_text, kind = GPU_STATS[key]
                family = _family(name, help_text, kind)
                family.add_metric([], value)
                seen.add(name)
                yield family
        step_times = cumulative_buckets(status.gpu_stats)
        if step_times is not None:
            buckets, total = step_times
            yield HistogramMetricFamily("moondream_gpu_step_seconds", "Time of each GPU scheduler step, all GPU workers",
                                        buckets=buckets, sum_value=total)
        restarts = status.worker_restarts
        if restarts:
            family = CounterMetricFamily("moondream_worker_restarts", "Workers that registered again (restarted or reconnected), by kind",
                                         labels=["kind"])
            for kind, count in restarts.items():
                family.add_metric([str(kind)], count)
            yield family
