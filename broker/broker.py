"""The broker: one process that every request passes through.

Front ends (DEALER) connect to `frontend` (ROUTER) and send Submit / Cancel /
StatusQuery.  Workers (DEALER) connect to `backend` (ROUTER), announce
themselves with Ready, then exchange Heartbeats with us (Paranoid Pirate).

A request moves through these stages, keyed by request_id:

    QUEUED_PREPROCESS -> PREPROCESSING -> QUEUED_GPU -> GENERATING -> (final reply)

(requests without an image start at QUEUED_GPU).  Preprocess jobs go to the
least-recently-used free preprocess worker (ZeroMQ Guide's load-balancing
broker); Generate goes to a GPU worker with free capacity.  Every Chunk, Result
and Error is routed back to the front end that sent the Submit.  Every accepted
request gets exactly one final Result or Error: from a worker, or from us on
timeout, cancel, overload or a dead worker.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import msgspec
import zmq

from shared import keys, priority, protocol
from shared.config import StartupError
from shared.logs import log_request
from shared.protocol import (
    CannotStart, Cancel, Chunk, Error, Generate, Heartbeat, Leaving, PreprocessJob, Preprocessed, Ready, Refused,
    RegisterAgain, Result, Status, StatusQuery, Submit,
)
from shared.tiling_geometry import resized_frame_size

log = logging.getLogger("broker")

QUEUED_PREPROCESS = "queued_preprocess"
PREPROCESSING = "preprocessing"
QUEUED_GPU = "queued_gpu"
GENERATING = "generating"

MAX_PREPROCESS_ATTEMPTS = 3  # an image that kills this many workers is not retried again
TICK_SECONDS = 0.1  # how often deadlines, grace periods and heartbeats are checked


@dataclass
class Worker:
    identity: bytes  # ZeroMQ routing id of its connection
    kind: str  # protocol.PREPROCESS | protocol.GPU
    worker_id: str  # its own name, for logs
    capacity: int
    model: dict
    expires_at: float  # monotonic; dead if silent past this
    jobs: set = field(default_factory=set)  # request ids it holds right now
    idle_since: float = 0.0  # for least-recently-used choice
    stats: dict = field(default_factory=dict)  # GPU: its scheduler counters from its last Heartbeat
    variants: dict = field(default_factory=dict)  # GPU: its loaded / available variant ids, from its last Heartbeat
    background_jobs: set = field(default_factory=set)  # GPU: of `jobs`, the batch lines
    slots: int = 1  # GPU: the capacity it registered with (heartbeats move `capacity` by messages in flight)

    @property
    def free(self) -> int:
        return self.capacity - len(self.jobs)

    def takes_background(self, interactive: bool = False) -> bool:
        """Batch lines never fill a GPU worker: some slots stay for interactive requests, and
        on a CPU fewer lines go on while interactive requests come (shared/priority.py)."""
        narrow = interactive and priority.narrows_on(str(self.model.get("device", "")))
        return len(self.background_jobs) < priority.background_slots(self.slots, narrow)


@dataclass
class Request:
    submit: Submit
    client: bytes  # routing id of the front end that sent it
    image: object  # encoded image frame until preprocessed, else None
    deadline: float  # time.time() after which we answer 504
    received: float  # monotonic
    stage: str = QUEUED_PREPROCESS
    worker: Optional[bytes] = None
    attempts: int = 0  # preprocess attempts
    generate: Optional[Generate] = None
    resized_frame: object = None  # from the preprocess worker (shared/tiling_geometry.py), until sent to a GPU worker
    waiting_since: float = 0.0  # monotonic time it entered its current queue
    marks: dict = field(default_factory=dict)  # stage timings, monotonic

    @property
    def request_id(self) -> str:
        return self.submit.request_id


class Broker:
    def __init__(self, config, context: Optional[zmq.Context] = None):
        self.config = config
        self.broker_id = uuid.uuid4().hex[:12]
        self.context = context or zmq.Context.instance()
        keys.require_keys_beyond_loopback(config, {"BROKER_FRONTEND_BIND": config.broker_frontend_bind,
                                                   "BROKER_BACKEND_BIND": config.broker_backend_bind})
        # With keys, a ZAP handler checks every connecting front end's and worker's key.
        self.authenticator = keys.start_authenticator(self.context, config) if config.curve_keys_dir else None
        self.frontend = self._bind(config.broker_frontend_bind, "BROKER_FRONTEND_BIND", keys.FRONTEND)
        self.backend = self._bind(config.broker_backend_bind, "BROKER_BACKEND_BIND", keys.WORKER)
        self.workers: dict[bytes, Worker] = {}
        self.workers_lost: dict[str, int] = {protocol.GPU: 0, protocol.PREPROCESS: 0}
        self.cannot_start: dict[str, str] = {}  # kind -> why its worker cannot start (until one registers)
        self.requests: dict[str, Request] = {}
        self.preprocess_queue: deque[str] = deque()
        self.gpu_queue: deque[str] = deque()
        self.interactive = priority.InteractiveTraffic()  # narrows batch lines' dispatch while it is present
        now = time.monotonic()
        self.no_gpu_since = now  # when the last GPU worker went away (or start-up)
        self.no_preprocess_since = now
        self.next_heartbeat = now
        self.stopping = False

    def _bind(self, address: str, setting: str, role: str) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer -> EHOSTUNREACH instead of a silent drop
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if self.config.curve_keys_dir:
            keys.secure_server(sock, self.config, role)
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self.close()
            raise StartupError(f"cannot listen on {setting}={address} ({exc.strerror}): another process, perhaps "
                               f"another copy of this service, holds it; give this one free ports "
                               f"(BROKER_FRONTEND_BIND/ADDR, BROKER_BACKEND_BIND/ADDR)") from None
        return sock

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        log.info("broker %s listening: front ends %s, workers %s (%s)", self.broker_id,
                 self.config.broker_frontend_bind, self.config.broker_backend_bind,
                 "CURVE keys required" if self.authenticator else "loopback only, no keys")
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        next_tick = time.monotonic()
        while not self.stopping:
            ready = dict(poller.poll(max(0, int((next_tick - time.monotonic()) * 1000))))
            # Workers first: their replies free capacity for the new requests.
            if self.backend in ready:
                self._drain(self.backend, self.handle_backend)
            if self.frontend in ready:
                self._drain(self.frontend, self.handle_frontend)
            self._safely(self.dispatch)
            if time.monotonic() >= next_tick:
                self._safely(self.tick)
                self._safely(self.dispatch)
                next_tick = time.monotonic() + TICK_SECONDS
        self.close()

    def _safely(self, step) -> None:
        """A bug in one step is logged; the broker keeps routing (its state is all in memory)."""
        try:
            step()
        except Exception:
            log.exception("%s failed", step.__name__)

    def close(self) -> None:
        for sock in (getattr(self, "frontend", None), getattr(self, "backend", None)):
            if sock is not None:
                sock.close()
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    def _drain(self, sock: zmq.Socket, handler, limit: int = 200) -> None:
        """Handle up to `limit` waiting messages; a bad message is logged and dropped."""
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # never let one message take the broker down
                log.exception("dropped a message that could not be handled")

    # ------------------------------------------------------------------ front ends
    def handle_frontend(self, frames: list) -> None:
        client = frames[0].bytes
        try:
            msg, blob = protocol.decode(frames[1:])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("malformed message from a front end dropped: %s", exc)
            rid = protocol.request_id_of(frames[1]) if len(frames) > 1 else None
            if rid is not None and isinstance(exc, msgspec.ValidationError):  # its sender waits for an answer
                self.send_to_client(client, protocol.encode(Error(rid, 422, "invalid_request", f"malformed request: {exc}")))
            return
        if isinstance(msg, Submit):
            self.on_submit(client, msg, blob)
        elif isinstance(msg, Cancel):
            self.cancel(msg.request_id, Error(msg.request_id, 499, "cancelled", "request cancelled"))
        elif isinstance(msg, StatusQuery):
            self.send_to_client(client, protocol.encode(self.status(msg.request_id)))
        else:
            log.warning("unexpected %s from a front end dropped", type(msg).__name__)

    def on_submit(self, client: bytes, msg: Submit, image) -> None:
        rid = msg.request_id
        if not rid or rid in self.requests:
            self.send_to_client(client, protocol.encode(
                Error(rid, 409, "duplicate_request_id", "request_id is empty or already in use")))
            return
        if msg.has_image and image is None:
            self.send_to_client(client, protocol.encode(Error(rid, 400, "missing_image", "has_image set but no image frame")))
            return
        if len(self.preprocess_queue) + len(self.gpu_queue) >= self.config.max_queue:
            self.send_to_client(client, protocol.encode(Error(rid, 429, "overloaded", "server busy, try again later")))
            log_request(log, rid, "overloaded", {}, skill=msg.skill, status=429)
            return
        now = time.monotonic()
        deadline = msg.deadline or (time.time() + self.config.request_timeout)
        req = Request(submit=msg, client=client, image=image if msg.has_image else None,
                      deadline=deadline, received=now, waiting_since=now)
        self.requests[rid] = req
        if not priority.is_background(msg.priority):
            self.interactive.started(now)
        if msg.has_image:
            self._enqueue(self.preprocess_queue, req)
        else:
            self._queue_for_gpu(req, Generate(
                request_id=rid, skill=msg.skill, params=msg.params, settings=msg.settings,
                stream=msg.stream, has_image=False, deadline=deadline, priority=msg.priority,
                seed=msg.seed, variant=msg.variant))

    def status(self, request_id: str) -> Status:
        gpus = [w for w in self.workers.values() if w.kind == protocol.GPU]
        queued = len(self.preprocess_queue) + len(self.gpu_queue)
        return Status(
            request_id=request_id,
            preprocess_workers=sum(w.kind == protocol.PREPROCESS for w in self.workers.values()),
            gpu_workers=len(gpus),
            gpu_ready=bool(gpus),
            model=dict(gpus[-1].model) if gpus else {},
            models=list({w.model.get("id", ""): dict(w.model) for w in gpus}.values()),
            queued=queued,
            in_flight=len(self.requests) - queued,
            broker_id=self.broker_id,
            gpu_slots=sum(w.capacity for w in gpus),
            gpu_free_slots=sum(w.free for w in gpus),
            gpu_stats=_sum_counters(w.stats for w in gpus),
            worker_restarts=dict(self.workers_lost),
            variants={part: sorted({v for w in gpus for v in w.variants.get(part, [])})
                      for part in ("loaded", "available")},
            deployment=self.config.deployment_id,
            # lets the batch worker see interactive traffic and yield to it
            background=sum(priority.is_background(r.submit.priority) for r in self.requests.values()),
            cannot_start=dict(self.cannot_start),
        )

    # ------------------------------------------------------------------ workers
    def handle_backend(self, frames: list) -> None:
        identity = frames[0].bytes
        try:
            msg, blob = protocol.decode(frames[1:])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("malformed message from a worker dropped: %s", exc)
            return
        if isinstance(msg, Ready):
            self.on_ready(identity, msg)
            return
        if isinstance(msg, CannotStart):
            if msg.deployment == self.config.deployment_id:
                log.warning("a %s worker cannot start: %s", msg.kind, msg.reason)
                self.cannot_start[msg.kind] = msg.reason
            return
        if isinstance(msg, Leaving):
            if identity in self.workers:
                self.remove_worker(identity, "left (stopped on purpose)", left=True)
            return
        worker = self.workers.get(identity)
        if worker is None:
            # Not registered (we restarted, or dropped it as silent): ask it to register
            # now rather than wait until it gives up on us.
            log.debug("%s from an unregistered worker dropped; asking it to register", type(msg).__name__)
            self.send_to_worker(identity, protocol.encode(RegisterAgain()))
            return
        worker.expires_at = time.monotonic() + self.config.heartbeat_expiry
        if isinstance(msg, Heartbeat):
            worker.stats = dict(msg.stats)
            worker.variants = dict(msg.variants)
            if worker.kind == protocol.GPU and msg.free >= 0:
                # free counts the slots not held by our jobs, so this is its total now
                # (off by the messages in flight for a moment; the next beat corrects it).
                worker.capacity = max(1, msg.free + len(worker.jobs))
        elif isinstance(msg, Preprocessed) and worker.kind == protocol.PREPROCESS:
            self.on_preprocessed(worker, msg, blob)
        elif isinstance(msg, Chunk) and worker.kind == protocol.GPU:
            req = self._request_held_by(worker, msg.request_id)
            if req is not None:
                req.marks.setdefault("first_chunk", time.monotonic())
                self.send_to_client(req.client, frames[1:], req)
        elif isinstance(msg, Error) or (isinstance(msg, Result) and worker.kind == protocol.GPU):
            self._job_done(worker, msg.request_id)
            req = self._request_held_by(worker, msg.request_id)
            if req is not None:
                if isinstance(msg, Result) and "preprocess_ms_worker" in req.marks:
                    msg.metrics["preprocess_time_ms"] = round(req.marks["preprocess_ms_worker"], 3)
                    frames = [None] + protocol.encode(msg)
                self.finish(req, frames[1:], msg)
        else:
            log.warning("unexpected %s from worker %s dropped", type(msg).__name__, worker.worker_id)

    def on_ready(self, identity: bytes, msg: Ready) -> None:
        if msg.deployment != self.config.deployment_id:
            reason = (f"this broker belongs to deployment {self.config.deployment_id!r}, the worker to "
                      f"{msg.deployment!r} (DEPLOYMENT_ID)")
            log.warning("worker %r (%s) refused: %s", msg.worker_id, msg.kind, reason)
            self.send_to_worker(identity, protocol.encode(Refused(reason)))
            return
        if msg.kind not in (protocol.PREPROCESS, protocol.GPU):
            log.warning("worker %r rejected: unknown kind %r", msg.worker_id, msg.kind)
            return
        # A worker that reconnected has a new identity: forget its old connection now.
        for old in [w for w in self.workers.values() if w.worker_id == msg.worker_id and w.identity != identity]:
            self.remove_worker(old.identity, "removed: re-registered on a new connection")
        if identity in self.workers:
            self.remove_worker(identity, "removed: sent Ready again")
        self.cannot_start.pop(msg.kind, None)
        now = time.monotonic()
        self.workers[identity] = Worker(
            identity=identity, kind=msg.kind, worker_id=msg.worker_id, capacity=max(1, msg.capacity),
            slots=max(1, msg.capacity), model=dict(msg.model), expires_at=now + self.config.heartbeat_expiry,
            idle_since=now, variants=dict(msg.variants))
        log.info("%s worker %s registered (capacity %d)", msg.kind, msg.worker_id, max(1, msg.capacity))
        self.send_to_worker(identity, protocol.encode(Heartbeat()))

    def on_preprocessed(self, worker: Worker, msg: Preprocessed, frame) -> None:
        self._job_done(worker, msg.request_id)
        req = self._request_held_by(worker, msg.request_id)
        if req is None:
            return
        try:
            frame_size = resized_frame_size(tuple(msg.tiling), tuple(msg.pixels_shape))
        except ValueError:
            frame_size = -1
        if frame is None or len(frame) != frame_size:
            self.finish(req, None, Error(req.request_id, 500, "preprocess_failed",
                                         "preprocess worker sent a resized frame of the wrong size"))
            return
        req.marks["preprocessed"] = time.monotonic()
        req.marks["preprocess_ms_worker"] = msg.preprocess_ms
        req.image = None  # the encoded image is no longer needed
        req.resized_frame = frame
        s = req.submit
        self._queue_for_gpu(req, Generate(
            request_id=s.request_id, skill=s.skill, params=s.params, settings=s.settings, stream=s.stream,
            has_image=True, tiling=tuple(msg.tiling), image_key=msg.image_key,
            deadline=req.deadline, pixels_shape=tuple(msg.pixels_shape), priority=s.priority,
            seed=s.seed, variant=s.variant))

    def _gpu_wants_pixels(self) -> bool:
        """The transformers engine takes whole images, not crops: then preprocessing ships both."""
        return any(w.kind == protocol.GPU and w.model.get("engine") == "transformers" for w in self.workers.values())

    def _request_held_by(self, worker: Worker, request_id: str) -> Optional[Request]:
        """The live request this worker is working on, or None (finished, cancelled, moved)."""
        req = self.requests.get(request_id)
        if req is None or req.worker != worker.identity or req.stage not in (PREPROCESSING, GENERATING):
            return None
        return req

    def _job_done(self, worker: Worker, request_id: str) -> None:
        if request_id in worker.jobs:
            worker.jobs.discard(request_id)
            worker.background_jobs.discard(request_id)
            worker.idle_since = time.monotonic()

    def remove_worker(self, identity: bytes, reason: str, left: bool = False) -> None:
        """Forget a worker; retry its preprocess jobs, fail its generations (not idempotent).
        `left`: it said goodbye (stopped on purpose), so it is not counted as lost."""
        worker = self.workers.pop(identity, None)
        if worker is None:
            return
        log.log(logging.INFO if left else logging.WARNING, "%s worker %s %s (%d jobs in flight)",
                worker.kind, worker.worker_id, reason, len(worker.jobs))
        if not left:
            self.workers_lost[worker.kind] = self.workers_lost.get(worker.kind, 0) + 1
        now = time.monotonic()
        for rid in sorted(worker.jobs):
            req = self.requests.get(rid)
            if req is None or req.worker != identity:
                continue
            if worker.kind == protocol.PREPROCESS and req.attempts < MAX_PREPROCESS_ATTEMPTS:
                req.stage, req.worker, req.waiting_since = QUEUED_PREPROCESS, None, now
                self.preprocess_queue.appendleft(rid)
            elif worker.kind == protocol.PREPROCESS:
                self.finish(req, None, Error(rid, 422, "preprocess_failed", "the image could not be processed"))
            else:
                self.finish(req, None, Error(rid, 503, "worker_died", "the GPU worker stopped while generating"))
        if not any(w.kind == protocol.GPU for w in self.workers.values()) and worker.kind == protocol.GPU:
            self.no_gpu_since = now
        if not any(w.kind == protocol.PREPROCESS for w in self.workers.values()) and worker.kind == protocol.PREPROCESS:
            self.no_preprocess_since = now

    # ------------------------------------------------------------------ moving work
    def _queue_for_gpu(self, req: Request, generate: Generate) -> None:
        req.generate = generate
        req.stage, req.worker, req.waiting_since = QUEUED_GPU, None, time.monotonic()
        self._enqueue(self.gpu_queue, req)

    def _enqueue(self, queue: deque, req: Request) -> None:
        """Queue by the shared priority policy (shared/priority.py): batch lines at the tail."""
        priority.enqueue(queue, req.request_id, req.submit.priority, self._priority)

    def _priority(self, request_id: str) -> int:
        req = self.requests.get(request_id)
        return req.submit.priority if req is not None else protocol.INTERACTIVE

    def dispatch(self) -> None:
        """Hand queued requests to free workers: preprocess LRU, GPU most free capacity."""
        while self.preprocess_queue:
            worker = self._pick(protocol.PREPROCESS)
            if worker is None:
                break
            req = self.requests.get(self.preprocess_queue.popleft())
            if req is None:
                continue
            req.stage, req.worker = PREPROCESSING, worker.identity
            req.attempts += 1
            req.marks.setdefault("preprocess_start", time.monotonic())
            worker.jobs.add(req.request_id)
            job = PreprocessJob(request_id=req.request_id, deadline=req.deadline, want_pixels=self._gpu_wants_pixels())
            self.send_to_worker(worker.identity, protocol.encode(job, req.image))
        # The queue holds interactive requests first; each goes to a worker of its model, and a
        # model whose workers are full does not hold up the others' requests behind it.
        full = set()  # (model, background) with no free worker this round
        interactive = self.interactive.present(time.monotonic())
        for rid in list(self.gpu_queue):
            req = self.requests.get(rid)
            if req is None:
                self.gpu_queue.remove(rid)
                continue
            background = priority.is_background(req.submit.priority)
            if (req.submit.model, background) in full:
                continue
            worker = self._pick(protocol.GPU, background, req.submit.model, interactive)
            if worker is None:
                full.add((req.submit.model, background))
                continue
            self.gpu_queue.remove(rid)
            req.stage, req.worker = GENERATING, worker.identity
            req.marks["gpu_start"] = time.monotonic()
            worker.jobs.add(req.request_id)
            if background:
                worker.background_jobs.add(req.request_id)
            frame, req.resized_frame = req.resized_frame, None  # the GPU worker holds it from now on
            self.send_to_worker(worker.identity, protocol.encode(req.generate, frame))

    def _pick(self, kind: str, background: bool = False, model: str = "", interactive: bool = False) -> Optional[Worker]:
        """A free worker of `kind` (GPU: serving `model`, any when "")."""
        candidates = [w for w in self.workers.values()
                      if w.kind == kind and w.free > 0 and (not background or w.takes_background(interactive))
                      and (not model or w.model.get("id", "") == model)]
        if not candidates:
            return None
        if kind == protocol.GPU:
            return max(candidates, key=lambda w: (w.free, -w.idle_since))
        return min(candidates, key=lambda w: w.idle_since)

    def cancel(self, request_id: str, reply: Error) -> None:
        """Stop a request wherever it is and answer it with `reply` (idempotent)."""
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.stage == GENERATING:
            worker = self.workers.get(req.worker)
            if worker is not None:
                worker.jobs.discard(request_id)  # the worker aborts it at once
                worker.background_jobs.discard(request_id)
                self.send_to_worker(worker.identity, protocol.encode(Cancel(request_id)))
        # A preprocess job in flight runs to the end; its reply is then dropped.
        self.finish(req, None, reply)

    def finish(self, req: Request, frames: Optional[list], msg) -> None:
        """Send the one final reply of a request and forget it."""
        rid = req.request_id
        if self.requests.pop(rid, None) is not None and not priority.is_background(req.submit.priority):
            self.interactive.ended(time.monotonic())
        for queue in (self.preprocess_queue, self.gpu_queue):
            if req.stage in (QUEUED_PREPROCESS, QUEUED_GPU) and rid in queue:
                queue.remove(rid)
        self.send_to_client(req.client, frames if frames is not None else protocol.encode(msg))
        self._log_done(req, msg)

    def _log_done(self, req: Request, msg) -> None:
        now, marks = time.monotonic(), req.marks
        timings = {"total": (now - req.received) * 1000}
        if "preprocess_start" in marks:
            timings["queue"] = (marks["preprocess_start"] - req.received) * 1000
            if "preprocessed" in marks:
                timings["preprocess"] = (marks["preprocessed"] - marks["preprocess_start"]) * 1000
        if "gpu_start" in marks:
            timings["gpu_queue"] = (marks["gpu_start"] - marks.get("preprocessed", req.received)) * 1000
            timings["gpu"] = (now - marks["gpu_start"]) * 1000
            if "first_chunk" in marks:
                timings["ttft"] = (marks["first_chunk"] - req.received) * 1000
        if isinstance(msg, Error):
            log_request(log, req.request_id, "error", timings, skill=req.submit.skill, status=msg.status, code=msg.code)
        else:
            log_request(log, req.request_id, "ok", timings, skill=req.submit.skill, status=200,
                        finish_reason=getattr(msg, "finish_reason", None))

    # ------------------------------------------------------------------ timers
    def tick(self) -> None:
        """Deadlines, no-worker grace periods, heartbeats and dead workers."""
        now, wall = time.monotonic(), time.time()
        for req in [r for r in self.requests.values() if r.deadline <= wall]:
            self.cancel(req.request_id, Error(req.request_id, 504, "timeout", "request timed out"))
        grace = self.config.no_gpu_grace
        serving = {w.model.get("id", "") for w in self.workers.values() if w.kind == protocol.GPU}
        for rid in list(self.gpu_queue):
            req = self.requests[rid]
            want = req.submit.model
            if serving and (not want or want in serving):
                continue
            if now - max(req.waiting_since, self.no_gpu_since) > grace:
                why = f"no GPU worker serves model {want} now" if serving else "no GPU worker is available"
                self.finish(req, None, Error(rid, 503, "no_gpu_worker", why))
        if not any(w.kind == protocol.PREPROCESS for w in self.workers.values()):
            for rid in list(self.preprocess_queue):
                req = self.requests[rid]
                if now - max(req.waiting_since, self.no_preprocess_since) > grace:
                    self.finish(req, None, Error(rid, 503, "no_preprocess_worker", "no image worker is available"))
        for worker in [w for w in self.workers.values() if w.expires_at <= now]:
            self.remove_worker(worker.identity, "removed: heartbeat expired")
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.config.heartbeat_interval
            beat = protocol.encode(Heartbeat())
            for identity in list(self.workers):
                self.send_to_worker(identity, beat)

    # ------------------------------------------------------------------ sending
    def send_to_client(self, client: bytes, frames: list, req: Optional[Request] = None) -> None:
        try:
            self.frontend.send_multipart([client, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            # Front end gone (EHOSTUNREACH) or hopelessly behind (EAGAIN): stop the work for it.
            log.warning("could not reach a front end (%s)", exc.strerror)
            if req is not None and req.request_id in self.requests:
                self.cancel(req.request_id, Error(req.request_id, 499, "client_gone", "front end unreachable"))

    def send_to_worker(self, identity: bytes, frames: list) -> None:
        try:
            self.backend.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            worker = self.workers.get(identity)
            if worker is not None:  # gone without a goodbye; the main loop re-dispatches its work
                self.remove_worker(identity, f"removed: connection lost ({exc.strerror})")


def _sum_counters(dicts) -> dict:
    """Numeric counters of several workers, added up per key."""
    total: dict = {}
    for d in dicts:
        for key, value in d.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total
