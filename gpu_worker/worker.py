"""The GPU worker's process loop: the broker's Generate requests in, events out.

One loop, no threads: take every message waiting on the socket (without
blocking while there is work, so new requests join the running batch and
Cancels apply at once), run one scheduler step, send its events, heartbeat.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from gpu_worker.engine_types import EngineRequest, Failed, Finished, ImageInput, TextChunk
from gpu_worker.scheduler import Scheduler
from shared import protocol
from shared.broker_link import BrokerLink
from shared.protocol import Cancel, Chunk, Error, Generate, Result

log = logging.getLogger("gpu_worker")

CROP_SHAPE = (378, 378, 3)


class GpuWorker:
    def __init__(self, config, model, context=None):
        self.config = config
        self.model = model
        self.scheduler = Scheduler(model, max_batch=config.batch_size, image_cache_bytes=config.image_cache_mb << 20)
        self.active: set[str] = set()  # request ids the scheduler holds for the broker
        self.stopping = False
        self.link = BrokerLink(config, protocol.GPU, capacity=lambda: max(0, self.scheduler.free_slots()),
                               model=dict(model.info), context=context)

    def run(self) -> None:
        idle_wait = min(0.25, self.config.heartbeat_interval)
        while not self.stopping:
            was_idle = not self.scheduler.has_work()
            got_work = self._receive(0 if not was_idle else idle_wait)
            if was_idle and got_work:
                self._gather(self.config.batch_timeout)  # let a burst arrive before the first step
            if self.scheduler.has_work():
                self._step()
            if self.link.keep_alive():
                self._drop_all("lost the broker")
        self.link.close()

    # ------------------------------------------------------------------ input
    def _gather(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._receive(left)

    def _receive(self, timeout: float) -> bool:
        """Handle every waiting message; True if any Generate came in."""
        got_work = False
        for msg, blob in self.link.receive(timeout):
            try:
                if isinstance(msg, Generate):
                    self._start(msg, blob)
                    got_work = True
                elif isinstance(msg, Cancel):
                    self.scheduler.abort(msg.request_id)
                    self.active.discard(msg.request_id)
                else:
                    log.warning("unexpected %s from the broker dropped", type(msg).__name__)
            except Exception:  # one bad request must not stop the others
                log.exception("could not handle %s", type(msg).__name__)
                rid = getattr(msg, "request_id", "")
                if rid:
                    self.active.discard(rid)
                    self.link.send(Error(rid, 500, "generation_failed", "internal error starting the request"))
        return got_work

    def _start(self, msg: Generate, crops) -> None:
        rid = msg.request_id
        if rid in self.active:
            return  # duplicate delivery; the first one answers
        image = None
        if msg.has_image:
            expected = msg.n_crops * int(np.prod(CROP_SHAPE))
            if crops is None or msg.n_crops < 1 or len(crops) != expected:
                self.link.send(Error(rid, 400, "invalid_image", "crops missing or of the wrong size"))
                return
            # A writable copy: the frame's memory is read-only and torch wants to own its input.
            pixels = np.frombuffer(crops, dtype=np.uint8).reshape(msg.n_crops, *CROP_SHAPE).copy()
            image = ImageInput(crops=pixels, tiling=tuple(msg.tiling), key=msg.image_key)
        request = EngineRequest(request_id=rid, skill=msg.skill, params=dict(msg.params),
                                settings=dict(msg.settings), image=image)
        try:
            self.scheduler.add(request)
        except ValueError as exc:
            self.link.send(Error(rid, 422, "invalid_request", str(exc)))
            return
        self.active.add(rid)

    # ------------------------------------------------------------------ stepping and output
    def _step(self) -> None:
        try:
            events = self.scheduler.step()
        except Exception as exc:
            # A failed step leaves the batch in an unknown state: fail what it held, keep serving.
            log.exception("scheduler step failed")
            self._drop_all(f"generation failed: {type(exc).__name__}", reply=True)
            return
        for event in events:
            self._send_event(event)

    def _send_event(self, event) -> None:
        rid = event.request_id
        if rid not in self.active:
            return  # cancelled meanwhile
        if isinstance(event, TextChunk):
            self.link.send(Chunk(rid, event.text))
        elif isinstance(event, Finished):
            self.active.discard(rid)
            self.link.send(Result(rid, event.output, event.finish_reason, event.metrics))
        elif isinstance(event, Failed):
            self.active.discard(rid)
            self.link.send(Error(rid, event.status, "generation_failed", event.message))

    def _drop_all(self, why: str, reply: bool = False) -> None:
        for rid in sorted(self.active):
            self.scheduler.abort(rid)
            if reply:
                self.link.send(Error(rid, 500, "generation_failed", why))
        if self.active:
            log.warning("dropped %d requests: %s", len(self.active), why)
        self.active.clear()
