"""A worker's connection to the broker (Paranoid Pirate, ZeroMQ Guide ch. 4).

Used by the preprocess and GPU workers: a DEALER socket that announces the
worker with Ready, sends a Heartbeat every interval, and treats the broker as
gone when it hears nothing for `heartbeat_expiry` seconds.  Then it closes the
socket, waits (1 s doubling to 32 s) and connects and registers again.  Any
message from the broker counts as a sign of life.

What cannot be retried ends the worker with StartupError (its main exits EXIT_CONFIG, and
supervisord leaves it down): a broker address beyond loopback without CURVE keys, a broker that
refuses our key, or one of another deployment (Refused).  Stopping on purpose says Leaving.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Optional

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from shared import keys, protocol
from shared.config import StartupError
from shared.liveness import Liveness
from shared.protocol import Heartbeat, Leaving, Ready, Refused, RegisterAgain

log = logging.getLogger("broker_link")

MIN_BACKOFF = 1.0
MAX_BACKOFF = 32.0


def default_worker_id(kind: str) -> str:
    return f"{kind}-{socket.gethostname()}-{os.getpid()}"


class BrokerLink:
    def __init__(self, config, kind: str, capacity: Callable[[], int], model: Optional[dict] = None,
                 stats: Optional[Callable[[], dict]] = None,
                 variants: Optional[Callable[[], dict]] = None,
                 worker_id: Optional[str] = None, context: Optional[zmq.Context] = None):
        self.config = config
        self.kind = kind
        self.capacity = capacity  # called for Ready and every Heartbeat
        self.stats = stats or dict  # counters sent with every Heartbeat (metrics)
        self.variants = variants or dict  # GPU worker: loaded / available variant ids, with every Heartbeat
        self.model = model or {}
        self.worker_id = worker_id or default_worker_id(kind)
        self.context = context or zmq.Context.instance()
        self.socket: Optional[zmq.Socket] = None
        self.monitor: Optional[zmq.Socket] = None  # CURVE handshake failures (keys set only)
        self.backoff = MIN_BACKOFF
        self.register_again = False
        self.liveness = Liveness(config.heartbeat_interval, config.heartbeat_expiry)
        keys.require_keys_beyond_loopback(config, {"BROKER_BACKEND_ADDR": config.broker_backend_addr})
        self.connect()

    def connect(self) -> None:
        self._close_sockets()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 1000)
        if self.config.curve_keys_dir:
            keys.secure_client(self.socket, self.config, keys.WORKER)
            self.monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.socket.connect(self.config.broker_backend_addr)
        self.liveness.restart(first_beat_in=self.config.heartbeat_interval)  # Ready counts as the first
        self.send(self._ready())
        log.info("connecting to broker at %s as %s", self.config.broker_backend_addr, self.worker_id)

    def _ready(self) -> Ready:
        return Ready(kind=self.kind, worker_id=self.worker_id, capacity=max(1, self.capacity()),
                     model=self.model, deployment=self.config.deployment_id, variants=self.variants())

    def _check_refused(self) -> None:
        """StartupError once the broker has turned our CURVE key down (retrying cannot help)."""
        if self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            raise StartupError(f"the broker at {self.config.broker_backend_addr} refused this worker's CURVE key "
                               f"(status {event['value']}): add its worker.key to the broker's CURVE_KEYS_DIR")

    def send(self, msg: protocol.Message, blob=None) -> bool:
        """Send without blocking; False when it could not go out (broker gone; we notice by silence)."""
        try:
            self.socket.send_multipart(protocol.encode(msg, blob), zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:
            log.warning("could not send %s to the broker: %s", type(msg).__name__, exc.strerror)
            return False

    def send_frames(self, frames: list) -> bool:
        """Send already-encoded payload frames (see send)."""
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:
            log.warning("could not send to the broker: %s", exc.strerror)
            return False

    def receive(self, timeout: float) -> list:
        """Wait up to `timeout` seconds for messages; return every (msg, blob) waiting, heartbeats left out."""
        received = []
        if not self.socket.poll(int(timeout * 1000), zmq.POLLIN):
            return received
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return received
            self.liveness.heard()
            self.backoff = MIN_BACKOFF  # the broker answers: next outage starts over at 1 s
            try:
                msg, blob = protocol.decode(frames)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("malformed message from the broker dropped: %s", exc)
                continue
            if isinstance(msg, Refused):
                raise StartupError(f"the broker at {self.config.broker_backend_addr} refused this worker: {msg.reason}")
            if isinstance(msg, RegisterAgain):
                self.register_again = True  # handled by keep_alive, which drops the work we held
            elif not isinstance(msg, Heartbeat):
                received.append((msg, blob))

    def keep_alive(self, on_lost: Optional[Callable[[], None]] = None) -> bool:
        """Heartbeat when due; reconnect when the broker went silent.  True after a reconnect: the caller
        must drop the work it held (the broker has given up on it); `on_lost` is
        called as soon as the broker is given up, before the backoff wait."""
        self._check_refused()
        now = time.monotonic()
        if self.register_again:
            # A broker that does not know us (it restarted): what we held is forgotten there.
            log.warning("the broker does not know this worker: registering again")
            self.register_again = False
            if on_lost is not None:
                on_lost()
            self.send(self._ready())
            return True
        if self.liveness.gone(now):
            log.warning("broker silent for %.1f s; reconnecting in %.0f s", self.liveness.silent_for(now), self.backoff)
            if on_lost is not None:
                on_lost()
            self._close_sockets()
            time.sleep(self.backoff)
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)
            self.connect()
            return True
        if self.liveness.beat_due(now):
            self.send(Heartbeat(worker_id=self.worker_id, free=self.capacity(), stats=self.stats(),
                                variants=self.variants()))
        return False

    def close(self) -> None:
        """Say goodbye (so the broker logs a departure, not a lost worker) and close."""
        if self.socket is not None:
            self.send(Leaving(worker_id=self.worker_id))
            self.socket.setsockopt(zmq.LINGER, 500)  # long enough for the goodbye to leave
        self._close_sockets(linger=None)

    def _close_sockets(self, linger: Optional[int] = 0) -> None:
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if self.socket is not None:
            self.socket.close(linger=linger)
            self.socket = None


def tell_cannot_start(config, kind: str, reason: str, wait_s: float = 2.0) -> None:
    """Before exiting 78 without ever registering: tell the broker why (CannotStart), so that
    /health says it.  Best effort: a broker that is not there is not waited for beyond `wait_s`."""
    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, int(wait_s * 1000))  # time for the message to go out on close
        if config.curve_keys_dir:
            keys.secure_client(sock, config, keys.WORKER)
        sock.connect(config.broker_backend_addr)
        sock.send_multipart(protocol.encode(protocol.CannotStart(kind=kind, reason=reason,
                                                                 deployment=config.deployment_id)), zmq.NOBLOCK)
        sock.close()
    except (zmq.ZMQError, StartupError, OSError) as exc:
        log.warning("could not tell the broker why this worker cannot start: %s", exc)
    finally:
        context.term()
