"""How the HTTP front end and the batch worker talk to the broker.

Many waitress threads use one BrokerClient.  ZeroMQ sockets are not thread
safe, so one background I/O thread owns the DEALER connected to the broker
(the vLLM v1 client/EngineCore split):

    request thread --(lock + inproc PUSH)--> I/O thread --DEALER--> broker
    broker --DEALER--> I/O thread --(per-request queue.Queue)--> request thread

The I/O thread also pings the broker (StatusQuery) every heartbeat interval.
When the broker stops answering, or answers with a new broker_id (it
restarted and forgot our requests), every open request ends with
Error(503, "broker_unavailable") instead of hanging.

Requests go out only to a broker that has proved it is ours: its Status names our
DEPLOYMENT_ID (and with CURVE_KEYS_DIR, the handshake proved its key).  Until
then they wait; a broker of another deployment gets none, and `problem` says why
(/health shows it).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from typing import Iterator, Optional, Union

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from broker_client.waiting import wait_events
from shared import keys, protocol
from shared.liveness import Liveness
from shared.protocol import Cancel, Chunk, Error, Result, Status, StatusQuery, Submit

log = logging.getLogger("broker_client")

Event = Union[Chunk, Result, Error]
# Our own status queries start with "#", which no request id has (a client's X-Request-ID is only
# ever a label inside one: frontend/app.py SAFE_REQUEST_ID leaves "#" out).
_PING_PREFIX = "#ping-"


def _unavailable(request_id: str, why: str) -> Error:
    return Error(request_id, 503, "broker_unavailable", why)


class ReplyStream:
    """The events of one request, in order, ending with one Result or Error.  The
    front end reads them with next_event() through broker_client.waiting.wait_events, which
    also enforces the deadline and watches the HTTP client."""

    def __init__(self, client: "BrokerClient", request_id: str, replies: queue.Queue, deadline: float):
        self.request_id = request_id
        self._client = client
        self._replies = replies
        self._deadline = deadline  # time.time() at which the broker answers 504
        self._done = False

    def next_event(self, timeout: float) -> Event:
        """The next event; raises TimeoutError when none arrives within `timeout` seconds."""
        try:
            event = self._replies.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise TimeoutError(f"no reply for {self.request_id} within {timeout:.1f} s") from None
        if isinstance(event, (Result, Error)):
            self._done = True
        return event

    def __iter__(self) -> Iterator[Event]:
        """Every event to the end, for scripts and tests: the front end's own loop
        (one deadline rule, one grace period), without an HTTP client to watch."""
        return wait_events(self, self._deadline, client_gone=None)

    def cancel(self) -> None:
        """Tell the broker to stop this request (no-op once it has finished)."""
        if self._done:
            return
        self._done = True
        self._client._cancel(self.request_id)


class BrokerClient:
    def __init__(self, config, context: Optional[zmq.Context] = None):
        self.config = config
        self.context = context or zmq.Context.instance()
        self._replies: dict[str, queue.Queue] = {}  # request_id -> its reply queue
        self._replies_lock = threading.Lock()
        self._sent_on: dict[str, int] = {}  # request_id -> number of the connection it went out on
        self._status_ids: set[str] = set()  # which of _replies are status() calls (told apart by this, never by name)
        self._connection = 0  # I/O thread: counts the broker connections lost so far
        self._closed = threading.Event()
        self._ids = itertools.count()
        self.problem: Optional[str] = None  # why the broker we reach is not usable (I/O thread writes)
        self._verified = False  # I/O thread: the broker we reach now has proved it is ours
        keys.require_keys_beyond_loopback(config, {"BROKER_FRONTEND_ADDR": config.broker_frontend_addr})

        # Request threads hand outgoing messages to the I/O thread through an inproc pipe.
        address = f"inproc://broker-client-{uuid.uuid4().hex}"
        self._inbox = self.context.socket(zmq.PULL)  # used by the I/O thread only
        self._inbox.bind(address)
        self._outbox = self.context.socket(zmq.PUSH)  # used by request threads, under the lock
        self._outbox.setsockopt(zmq.LINGER, 0)
        self._outbox.connect(address)
        self._outbox_lock = threading.Lock()

        self._thread = threading.Thread(target=self._io_loop, name="broker-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API for request threads
    def submit(self, msg: Submit, image: Optional[bytes] = None) -> ReplyStream:
        replies: queue.Queue = queue.Queue()
        with self._replies_lock:
            self._replies[msg.request_id] = replies
        if self._closed.is_set():
            replies.put(_unavailable(msg.request_id, "client closed"))
        else:
            self._hand_to_io(msg.request_id, protocol.encode(msg, image if msg.has_image else None))
        return ReplyStream(self, msg.request_id, replies, msg.deadline or time.time() + self.config.request_timeout)

    def status(self, timeout: float = 1.0) -> Optional[Status]:
        """The broker's Status, or None when it does not answer within `timeout` seconds."""
        request_id = f"#status-{uuid.uuid4().hex}"
        replies: queue.Queue = queue.Queue()
        with self._replies_lock:
            self._replies[request_id] = replies
            self._status_ids.add(request_id)
        try:
            self._hand_to_io(request_id, protocol.encode(StatusQuery(request_id)))
            reply = replies.get(timeout=timeout)
            ours = isinstance(reply, Status) and reply.deployment == self.config.deployment_id
            return reply if ours else None
        except queue.Empty:
            return None
        finally:
            self._forget(request_id)
            with self._replies_lock:
                self._status_ids.discard(request_id)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=5)
        with self._outbox_lock:
            self._outbox.close()
        self._fail_all("client closed")

    # ------------------------------------------------------------------ internals
    def _hand_to_io(self, request_id: str, frames: list) -> None:
        try:
            with self._outbox_lock:
                self._outbox.send_multipart([request_id.encode(), *frames], copy=False)
        except zmq.ZMQError:  # closed meanwhile
            self._deliver(request_id, _unavailable(request_id, "client closed"), final=True)

    def _cancel(self, request_id: str) -> None:
        if self._forget(request_id) is not None and not self._closed.is_set():
            self._hand_to_io(request_id, protocol.encode(Cancel(request_id)))

    def _forget(self, request_id: str) -> Optional[queue.Queue]:
        with self._replies_lock:
            self._sent_on.pop(request_id, None)
            return self._replies.pop(request_id, None)

    def _deliver(self, request_id: str, event, final: bool) -> None:
        with self._replies_lock:
            replies = self._replies.pop(request_id, None) if final else self._replies.get(request_id)
            if final:
                self._sent_on.pop(request_id, None)
        if replies is not None:  # unknown or finished request ids are dropped
            replies.put(event)

    def _fail_all(self, why: str, sent_before_connection: Optional[int] = None) -> None:
        """Fail every open request; with `sent_before_connection`, only those sent on an
        earlier connection (a restarted broker never saw them; later ones it holds, and ones not
        sent yet still go to it)."""
        with self._replies_lock:
            failing = [rid for rid in self._replies if rid not in self._status_ids
                       and (sent_before_connection is None or self._sent_on.get(rid, sent_before_connection) < sent_before_connection)]
            failing = [(rid, self._replies.pop(rid)) for rid in failing]
            for rid, _ in failing:
                self._sent_on.pop(rid, None)
        for request_id, replies in failing:
            replies.put(_unavailable(request_id, why))

    def _io_loop(self) -> None:
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a broker we are not connected to
        if self.config.curve_keys_dir:
            keys.secure_client(dealer, self.config, keys.FRONTEND)
        dealer.connect(self.config.broker_frontend_addr)
        # Connection events number the connections, so that a restarted broker fails only
        # the requests sent to its predecessor.
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(self._inbox, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        liveness = Liveness(self.config.heartbeat_interval, self.config.heartbeat_expiry)  # status pings as heartbeats
        expiry = self.config.heartbeat_expiry
        unsent: list[tuple[float, str, list]] = []  # (first try, request_id, frames) waiting for a connection
        broker_id = None
        warned = False
        try:
            while not self._closed.is_set():
                ready = dict(poller.poll(100))
                now = time.monotonic()
                if monitor in ready:
                    while True:
                        try:
                            event = recv_monitor_message(monitor, zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                            self._set_problem(f"the broker at {self.config.broker_frontend_addr} refused this front "
                                              f"end's CURVE key: add its frontend.key to the broker's CURVE_KEYS_DIR")
                            continue
                        self._connection += 1  # the broker went away; what we send next goes to its successor
                        self._verified = False  # whoever answers next proves again that it is ours
                if self._inbox in ready:
                    while True:
                        try:
                            frames = self._inbox.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        unsent.append((now, frames[0].bytes.decode(), frames[1:]))
                unsent = self._send_waiting(dealer, unsent, now, expiry, verified=self._verified)
                if dealer in ready:
                    broker_id = self._read_replies(dealer, liveness, broker_id)
                if liveness.beat_due(now):
                    try:
                        dealer.send_multipart(protocol.encode(StatusQuery(f"{_PING_PREFIX}{next(self._ids)}")), zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass  # not connected; silence handles it
                if liveness.gone(now):
                    with self._replies_lock:
                        waiting = any(rid not in self._status_ids for rid in self._replies)
                    if waiting:
                        if not warned:  # once per outage, not once per request
                            log.warning("broker silent for %.1f s: failing open requests", liveness.silent_for(now))
                            warned = True
                        self._fail_all("the broker is not answering")
                else:
                    warned = False
        finally:
            dealer.disable_monitor()
            monitor.close(linger=0)
            dealer.close(linger=0)
            self._inbox.close(linger=0)

    def _send_waiting(self, dealer: zmq.Socket, unsent: list, now: float, expiry: float, verified: bool) -> list:
        """Send what we can; fail what could not reach a broker for `expiry` seconds.  Work goes
        only to a verified broker (status queries go anywhere: they are how it proves itself)."""
        still_waiting = []
        for first_try, request_id, frames in unsent:
            if not verified and request_id not in self._status_ids:
                if self.problem:  # a broker that is not ours answers there: no point waiting
                    self._deliver(request_id, _unavailable(request_id, self.problem), final=True)
                elif now - first_try > expiry:
                    self._deliver(request_id, _unavailable(request_id, "cannot reach the broker"), final=True)
                else:
                    still_waiting.append((first_try, request_id, frames))
                continue
            try:
                dealer.send_multipart(frames, zmq.NOBLOCK, copy=False)
                with self._replies_lock:
                    if request_id in self._replies:
                        self._sent_on[request_id] = self._connection
            except zmq.ZMQError:
                if now - first_try > expiry:
                    self._deliver(request_id, _unavailable(request_id, "cannot reach the broker"), final=True)
                else:
                    still_waiting.append((first_try, request_id, frames))
        return still_waiting

    def _set_problem(self, why: str) -> None:
        if why != self.problem:
            log.error("%s", why)
        self.problem = why
        self._fail_all(why)

    def _read_replies(self, dealer: zmq.Socket, liveness: Liveness, broker_id):
        while True:
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return broker_id
            liveness.heard()
            try:
                msg, _ = protocol.decode(frames)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("malformed reply from the broker dropped: %s", exc)
                continue
            if isinstance(msg, Status):
                if msg.deployment != self.config.deployment_id:
                    self._set_problem(f"the broker at {self.config.broker_frontend_addr} belongs to another deployment "
                                      f"({msg.deployment!r}, this front end is {self.config.deployment_id!r}): is another "
                                      f"copy of the service using these ports? (DEPLOYMENT_ID, BROKER_FRONTEND_ADDR)")
                    self._verified = False
                    if not msg.request_id.startswith(_PING_PREFIX):
                        self._deliver(msg.request_id, msg, final=True)  # status() turns it into None
                    continue
                self.problem, self._verified = None, True
                if broker_id is not None and msg.broker_id and msg.broker_id != broker_id:
                    log.warning("broker restarted: failing the requests it forgot")
                    self._fail_all("the broker restarted", sent_before_connection=self._connection)
                broker_id = msg.broker_id or broker_id
                if not msg.request_id.startswith(_PING_PREFIX):
                    self._deliver(msg.request_id, msg, final=True)
            elif isinstance(msg, (Chunk, Result, Error)):
                self._deliver(msg.request_id, msg, final=not isinstance(msg, Chunk))
