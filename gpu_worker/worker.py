"""The GPU worker's process loop: the broker's Generate requests in, events out.

Two threads, as in vLLM's EngineCore:

* the I/O thread (`BrokerIO`) owns the socket to the broker: it registers,
  heartbeats, reconnects, puts incoming messages on `inbox` and sends what the
  main thread pushes to it.  Heartbeats keep flowing while a long GPU step runs;
  when the main loop has made no progress for GPU_STEP_TIMEOUT seconds (a hung
  GPU) it ends the process, and supervisord starts a fresh one.
* the main thread runs the scheduler: take every waiting message (without
  blocking while there is work, so new requests join the running batch and
  Cancels apply at once), run one step, hand its events to the I/O thread.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid

import zmq

from gpu_worker.engine_types import EngineRequest, Failed, Finished, ImageInput, TextChunk
from gpu_worker.variants import VariantError, VariantStore, default_cache_dir
from shared import protocol
from shared.broker_link import BrokerLink
from shared.config import EXIT_CONFIG, StartupError, stay_down
from shared.image_tiling import split_resized_frame
from shared.protocol import Cancel, Chunk, Error, Generate, Result
from shared.step_times import StepTimes

log = logging.getLogger("gpu_worker")

RECONNECTED = object()  # put on the inbox when the broker is lost: drop all work


class BrokerIO(threading.Thread):
    """Socket I/O with the broker, on its own thread (ZeroMQ sockets stay in one thread)."""

    def __init__(self, config, context: zmq.Context, outbox_address: str, model_info: dict,
                 free_slots, healthy, stats=dict, variants=dict):
        super().__init__(name="broker-io", daemon=True)
        self.config = config
        self.context = context
        self.outbox_address = outbox_address
        self.model_info = model_info
        self.free_slots = free_slots  # callable: the scheduler's free capacity (a benign racy read)
        self.healthy = healthy  # callable: False when the main loop looks hung
        self.stats = stats  # callable: scheduler counters for the heartbeats (a benign racy read)
        self.variants = variants  # callable: loaded / available variant ids for the heartbeats
        self.inbox: queue.Queue = queue.Queue()
        self.stopping = False

    def run(self) -> None:
        outbox = self.context.socket(zmq.PULL)
        outbox.bind(self.outbox_address)
        link = BrokerLink(self.config, protocol.GPU, capacity=self.free_slots, model=self.model_info,
                          stats=self.stats, variants=self.variants, context=self.context)
        try:
            while not self.stopping:
                poller = zmq.Poller()  # rebuilt each time: a reconnect replaces link.socket
                poller.register(link.socket, zmq.POLLIN)
                poller.register(outbox, zmq.POLLIN)
                ready = dict(poller.poll(50))
                if outbox in ready:
                    while True:
                        try:
                            link.send_frames(outbox.recv_multipart(zmq.NOBLOCK, copy=False))
                        except zmq.Again:
                            break
                if link.socket in ready:
                    for item in link.receive(0):
                        self.inbox.put(item)
                if not self.healthy():
                    # A step that never returns (a hung GPU) cannot be interrupted: exit, so the
                    # broker fails its requests and supervisord starts a fresh worker.
                    log.error("no progress for %.1f s (GPU_STEP_TIMEOUT); exiting", self.config.gpu_step_timeout)
                    os._exit(4)
                # Lost the broker: the main loop drops its work before we wait to reconnect.
                link.keep_alive(on_lost=lambda: self.inbox.put(RECONNECTED))
        except StartupError as exc:  # the broker refused us (key, deployment): retrying cannot help
            log.error("%s", exc)
            os._exit(stay_down(EXIT_CONFIG))
        finally:
            link.close()
            outbox.close(linger=0)


class GpuWorker:
    def __init__(self, config, model, context=None):
        self.config = config
        # the native engine's continuous batching, or the transformers engine's one-at-a-time
        extra = {"variants": variant_store(config, model), "batch_yield_s": batch_yield_ms(config, model) / 1000} \
            if model.kind == "native" else {}
        if model.kind == "native":
            extra.update(kv_cache_bytes=int(config.kv_cache_gb * 1e9) or None, block_size=config.kv_block_size)
        self.scheduler = model.create_scheduler(max_batch=config.batch_size, image_cache_bytes=config.image_cache_mb << 20,
                                                **extra)
        self.active: set[str] = set()  # request ids the scheduler holds for the broker
        self.streaming: set[str] = set()  # of which the client wants text chunks as they come
        self.stopping = False
        self.last_progress = time.monotonic()
        self.step_times = StepTimes()  # every step's duration, for the heartbeats (shared/step_times.py)
        context = context or zmq.Context.instance()
        address = f"inproc://gpu-worker-outbox-{uuid.uuid4().hex}"
        self.io = BrokerIO(config, context, address, dict(model.info),
                           free_slots=self.scheduler.free_slots,
                           healthy=lambda: time.monotonic() - self.last_progress < config.gpu_step_timeout,
                           stats=self._stats, variants=self._variants)
        self.outbox = context.socket(zmq.PUSH)  # main thread only
        self.outbox.setsockopt(zmq.LINGER, 0)
        self.outbox.connect(address)

    def run(self) -> None:
        self.io.start()
        idle_wait = min(0.25, self.config.heartbeat_interval)
        try:
            while not self.stopping:
                self.last_progress = time.monotonic()
                was_idle = not self.scheduler.has_work()
                got_work = self._receive(idle_wait if was_idle else 0)
                if was_idle and got_work:
                    self._gather(self.config.batch_timeout)  # let a burst arrive before the first step
                if self.scheduler.has_work():
                    self._step()
        finally:
            self.io.stopping = True
            self.io.join(timeout=2)
            self.outbox.close()

    def _stats(self) -> dict:
        try:
            counters = {k: v for k, v in self.scheduler.stats().items() if isinstance(v, (int, float))}
            return {**counters, **self.step_times.as_stats()}
        except RuntimeError:  # read from the I/O thread while the scheduler changes: skip this beat
            return {}

    def _variants(self) -> dict:
        store = getattr(self.scheduler, "variants", None)
        if store is None:
            return {}
        try:
            return {"loaded": list(store.loaded), "available": store.available()}
        except (RuntimeError, OSError):  # read from the I/O thread while the store changes: skip this beat
            return {}

    def send(self, msg: protocol.Message) -> None:
        self.outbox.send_multipart(protocol.encode(msg))

    # ------------------------------------------------------------------ input
    def _gather(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._receive(left)

    def _receive(self, timeout: float) -> bool:
        """Handle every waiting message (waiting up to `timeout` for the first); True if a Generate came in."""
        got_work = False
        try:
            item = self.io.inbox.get(timeout=timeout) if timeout > 0 else self.io.inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            got_work |= self._handle(item)
            try:
                item = self.io.inbox.get_nowait()
            except queue.Empty:
                return got_work

    def _handle(self, item) -> bool:
        if item is RECONNECTED:
            self._drop_all("lost the broker")
            return False
        msg, blob = item
        try:
            if isinstance(msg, Generate):
                self._start(msg, blob)
                return True
            if isinstance(msg, Cancel):
                self.scheduler.abort(msg.request_id)
                self._forget(msg.request_id)
            else:
                log.warning("unexpected %s from the broker dropped", type(msg).__name__)
        except Exception:  # one bad request must not stop the others
            log.exception("could not handle %s", type(msg).__name__)
            rid = getattr(msg, "request_id", "")
            if rid:
                self.active.discard(rid)
                self.scheduler.abort(rid)
                self.send(Error(rid, 500, "generation_failed", "internal error starting the request"))
        return False

    def _start(self, msg: Generate, frame) -> None:
        rid = msg.request_id
        if rid in self.active:
            return  # duplicate delivery; the first one answers
        image = None
        if msg.has_image:
            # The crops are cut here from the resized image in the frame, into a new writable array
            # (the frame's memory is read-only and torch wants to own its input).
            try:
                crops, pixels = split_resized_frame(frame, tuple(msg.tiling), tuple(msg.pixels_shape))
            except ValueError as exc:
                self.send(Error(rid, 400, "invalid_image", f"resized frame missing or of the wrong size: {exc}"))
                return
            image = ImageInput(crops=crops, tiling=tuple(msg.tiling), key=msg.image_key, pixels=pixels)
        request = EngineRequest(request_id=rid, skill=msg.skill, params=msg.params,
                                settings=msg.settings, image=image, priority=msg.priority,
                                seed=msg.seed, variant=msg.variant, stream=msg.stream)
        try:
            self.scheduler.add(request)
        except VariantError as exc:  # unknown (404), bad id (400): answered before any GPU work
            self.send(Error(rid, exc.status, exc.code, str(exc)))
            return
        except ValueError as exc:
            self.send(Error(rid, 422, "invalid_request", str(exc)))
            return
        self.active.add(rid)
        if msg.stream:
            self.streaming.add(rid)

    # ------------------------------------------------------------------ stepping and output
    def _step(self) -> None:
        started = time.perf_counter()
        try:
            events = self.scheduler.step()
        except Exception as exc:
            # A failed step leaves the batch in an unknown state: fail what it held, keep serving.
            log.exception("scheduler step failed")
            self._drop_all(f"generation failed: {type(exc).__name__}", reply=True)
            return
        finally:  # a failed step took its time too
            self.step_times.observe(time.perf_counter() - started)
        for event in events:
            self._send_event(event)

    def _send_event(self, event) -> None:
        rid = event.request_id
        if rid not in self.active:
            return  # cancelled meanwhile
        if isinstance(event, TextChunk):
            if rid in self.streaming:  # a non-streamed answer arrives whole in its Result
                self.send(Chunk(rid, event.text))
        elif isinstance(event, Finished):
            self._forget(rid)
            self.send(Result(rid, event.output, event.finish_reason, event.metrics))
        elif isinstance(event, Failed):
            self._forget(rid)
            code = event.code or ("invalid_request" if 400 <= event.status < 500 else "generation_failed")
            self.send(Error(rid, event.status, code, event.message))

    def _forget(self, rid: str) -> None:
        self.active.discard(rid)
        self.streaming.discard(rid)

    def _drop_all(self, why: str, reply: bool = False) -> None:
        for rid in sorted(self.active):
            self.scheduler.abort(rid)
            if reply:
                self.send(Error(rid, 500, "generation_failed", why))
        if self.active:
            log.warning("dropped %d requests: %s", len(self.active), why)
        self.active.clear()
        self.streaming.clear()


def batch_yield_ms(config, model) -> int:
    """BATCH_YIELD_MS, or its default: on the CPU a step's time grows with its rows, so batch lines
    mostly sit out while interactive requests decode (one step per 250 ms keeps them moving); on a
    GPU a step costs about the same for 8 rows or 24, and sitting out would only slow the job."""
    if config.batch_yield_ms >= 0:
        return config.batch_yield_ms
    return 250 if str(model.device).startswith("cpu") else 0


def variant_store(config, model) -> VariantStore:
    """The variants this worker can serve: VARIANT_DIR, then the official cache layout."""
    directories = [p for p in (config.variant_dir, default_cache_dir() / "md_variants") if str(p)]
    return VariantStore(model.config, model.device, model.dtype, directories,
                        max_count=config.max_loaded_variants, max_bytes=config.variant_cache_mb << 20,
                        file_max_bytes=config.variant_max_mb << 20,
                        download_url=config.moondream_endpoint if config.variant_download else "",
                        download_key=config.moondream_api_key, download_timeout=config.variant_download_timeout)
