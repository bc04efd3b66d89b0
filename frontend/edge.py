"""The HTTP edge: waitress, set up so that abusive or overloading clients cannot
lock everyone else out.

waitress reads every request (headers and body) on one main thread (an
asyncore loop) and only then hands it to a thread pool that runs the app.  We
keep that design and add, with a small subclass of each of its server, channel,
parser and task:

* **Time limits on reading a request.**  waitress has an idle timeout but none
  on a request that arrives one byte a second.  A connection gets
  HTTP_HEADER_TIMEOUT to deliver its request line and headers and
  HTTP_BODY_TIMEOUT for the body; past that it is answered 408 and closed.
  The server's periodic maintenance (every CLEANUP_INTERVAL_S) checks.
* **Lanes.**  /health, /health/live and /metrics run on OPS_THREADS threads of
  their own, so probes never wait behind generation work (nor behind a flood
  of refusals, which have REFUSAL_THREADS threads of their own).
* **Backpressure at the door.**  Every other request counts against
  MAX_IN_FLIGHT from the moment it is read until its answer (a whole stream)
  is written.  Over the limit it is not queued for a request thread: it goes
  to the refusal lane, where the app answers 429 at once (`RefuseWhenBusy`),
  after the API key check and before any work.
* **Framing that could be read two ways is refused** (400 and close): both
  Content-Length and Transfer-Encoding, a bare LF in the head, a chunk larger
  than the body limit.
* **Lingering close.**  When the server closes after an answer (a 413 sent
  before the body was read, say), it stops writing, then reads and discards
  what the client still sends (bounded) before closing.  Closing at once would
  reset the connection, and a client that sends its whole body before reading
  (urllib, requests) would see "connection reset" instead of the answer.
* **JSON errors** from waitress's own error responses (`EdgeErrorTask`, on our channels only).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import re
import resource
import socket
import struct
import threading
import time
import uuid

import falcon
import waitress.utilities
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask

from frontend.listen import listening_socket
from shared.config import Config

log = logging.getLogger("frontend.edge")

# waitress answers bodies above max_request_body_size with its own 413 before
# reading them.  Letting a little more through means the app sees bodies just
# over the limit and answers them with the API's JSON 413 and a request id.
BODY_SLACK_BYTES = 1024 * 1024

# Requests answered on the ops lane: cheap, and needed most when the service is busy.
OPS_PATHS = frozenset({"/health", "/health/live", "/metrics"})
# Threads of the ops lane.  /health waits up to 1 s for the broker, so a few.
OPS_THREADS = 4
# Threads answering 429s and waitress's own errors: quick answers, no waiting.
REFUSAL_THREADS = 2
# How often waitress's maintenance runs (its default, 30 s, is too coarse for the timeouts above).
CLEANUP_INTERVAL_S = 1
# Lingering close (as nginx's lingering_time / lingering_timeout): read and discard
# what the client still sends for at most this long and this much, then close.
LINGER_S = 10.0
LINGER_MAX_BYTES = 256 * 1024 * 1024
LINGER_READ_BYTES = 256 * 1024

# waitress warns at every task that waits for a thread; on the refusal lane a
# queue is expected under a flood, so only errors from it are logged.
QUIET_QUEUE_LOG = logging.getLogger("frontend.edge.refusal_queue")
QUIET_QUEUE_LOG.setLevel(logging.ERROR)

# environ key set on a request refused at the door (read by RefuseWhenBusy)
TOO_BUSY_KEY = "moondream.too_busy"

_BARE_LF = re.compile(rb"(?<!\r)\n")


# ---------------------------------------------------------------- JSON errors
_WAITRESS_CODES = {400: "bad_request", 408: "request_timeout", 413: "payload_too_large",
                   431: "headers_too_large", 500: "internal_error"}


def too_large_message(max_body_bytes: int) -> str:
    """The one 413 message for a body over MAX_BODY_BYTES, from the app or from waitress."""
    return f"the request body is larger than MAX_BODY_BYTES ({max_body_bytes} bytes)"


def json_error_response(error: waitress.utilities.Error, max_body_bytes: int) -> tuple[str, list, bytes]:
    """Requests that never reach the app (malformed HTTP, a Content-Length far over
    the limit, a timeout) are answered by waitress itself, in plain text.  The API
    promises JSON errors everywhere: this is our shape for them, with a request id
    like every other answer, and the app's own 413 message."""
    code = _WAITRESS_CODES.get(error.code, "bad_request" if error.code < 500 else "internal_error")
    message = too_large_message(max_body_bytes) if error.code == 413 else f"{error.reason}: {error.body}"
    request_id = uuid.uuid4().hex
    body = json.dumps({"error": {"code": code, "message": message}, "request_id": request_id}).encode()
    return (f"{error.code} {error.reason}",
            [("Content-Type", "application/json"), ("X-Request-ID", request_id)], body)


class RequestTimeout(waitress.utilities.Error):
    code = 408
    reason = "Request Timeout"


# ---------------------------------------------------------------- in flight
class InFlight:
    """How many counted requests the front end holds; refuses beyond `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.count -= 1


class SharedInFlight(InFlight):
    """The count of every front end of the deployment against one limit.  With FRONTEND_WORKERS
    processes on one port the kernel spreads connections by a hash, unevenly: separate counts
    refused requests while the others had room.  The file holds one 8-byte count per process
    (its supervisord process number); each writes only its own, and reads the sum, under an
    flock.  A process zeroes its count when it starts: a killed one's requests died with it."""

    def __init__(self, limit: int, path: str, slot: int, slots: int):
        super().__init__(limit)
        self._slot, self._slots = slot, slots
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._locked():
            if os.fstat(self._fd).st_size < slots * 8:
                os.ftruncate(self._fd, slots * 8)
            self._map = mmap.mmap(self._fd, slots * 8)
            self._write_own(0)

    @contextlib.contextmanager
    def _locked(self):
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # other processes (threads of this one: self._lock)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _write_own(self, value: int) -> None:
        struct.pack_into("<q", self._map, self._slot * 8, value)

    def total(self) -> int:
        return sum(struct.unpack_from(f"<{self._slots}q", self._map))

    def try_acquire(self) -> bool:
        with self._lock, self._locked():
            if self.total() >= self.limit:
                return False
            self.count += 1
            self._write_own(self.count)
            return True

    def release(self) -> None:
        with self._lock, self._locked():
            self.count -= 1
            self._write_own(self.count)


def in_flight_count(config: Config) -> InFlight:
    """A count shared by the front ends when supervisord runs several (RUN_DIR and the process
    number come from it) against their limit together; else this process's own against
    MAX_IN_FLIGHT, or HTTP_THREADS (a lone front end, a Kubernetes pod)."""
    run_dir, name = os.environ.get("RUN_DIR"), os.environ.get("SUPERVISOR_PROCESS_NAME", "")
    number = name.rpartition("_")[2]
    if config.frontend_workers <= 1 or not run_dir or not number.isdigit() or int(number) >= config.frontend_workers:
        return InFlight(config.max_in_flight or config.http_threads)
    return SharedInFlight(config.in_flight_limit, os.path.join(run_dir, "frontend-in-flight"),
                          int(number), config.frontend_workers)


class RefuseWhenBusy:
    """Falcon middleware: a request the edge refused at the door gets 429 here,
    after authentication (a wrong key is still a 401) and before any work."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.env.get(TOO_BUSY_KEY):
            raise falcon.HTTPError(falcon.HTTP_429, code="overloaded", description="server busy, try again later",
                                   headers={"Retry-After": "1"})


# ---------------------------------------------------------------- waitress subclasses
class EdgeParser(HTTPRequestParser):
    """waitress's parser, stricter about framing, and noting when headers were complete."""

    headers_done_at = None  # time.monotonic()

    def received(self, data: bytes) -> int:
        if self.body_rcv is None and not self.completed and self._bare_lf_in_head(data):
            # waitress looks for CRLF CRLF only, so a head using bare LFs would wait forever.
            return self._refuse(data, "Bare LF in the request head")
        consumed = super().received(data)
        if self.headers_finished and self.headers_done_at is None:
            self.headers_done_at = time.monotonic()
        receiver = self.body_rcv
        if (self.chunked and not self.completed and receiver is not None
                and self.body_bytes_received + receiver.chunk_remainder >= self.adj.max_request_body_size):
            # A chunk larger than any body we accept: say so now instead of waiting for it.
            self.error = waitress.utilities.RequestEntityTooLarge(
                f"a chunk exceeds max_body of {self.adj.max_request_body_size}")
            self.completed = True
            return len(data)
        return consumed

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        # waitress lets chunked win over Content-Length (RFC 9112 allows that), but a
        # proxy in front may have trusted Content-Length: a smuggled request.  Refuse.
        if "CONTENT_LENGTH" in self.headers and (self.chunked or "TRANSFER_ENCODING" in self.headers):
            raise ParsingError("both Content-Length and Transfer-Encoding")

    def _bare_lf_in_head(self, data: bytes) -> bool:
        head = self.header_plus + data
        end = head.find(b"\r\n\r\n")  # what follows is body, where any byte goes
        return _BARE_LF.search(head[:end] if end >= 0 else head, max(0, len(self.header_plus) - 1)) is not None

    def _refuse(self, data: bytes, why: str) -> int:
        self.parse_header(b"GET / HTTP/1.1\r\n")  # the error task needs a version
        self.error = waitress.utilities.BadRequest(why)
        self.completed = True
        return len(data)


class EdgeTask(WSGITask):
    """Marks a request refused at the door, and gives its in-flight slot back
    as soon as its answer is written (before a pipelined next request is looked at)."""

    def get_environment(self):
        environ = super().get_environment()
        if getattr(self.request, "too_busy", False):
            environ[TOO_BUSY_KEY] = True
        return environ

    def service(self):
        try:
            super().service()
        finally:
            self.channel.server.release(self.request)


class EdgeErrorTask(ErrorTask):
    """waitress's answer to a request it refused itself, as our JSON error (only on our
    channels: waitress's own Error classes are left as they are)."""

    def execute(self):
        status, headers, body = json_error_response(self.request.error, self.channel.server.max_body_bytes)
        self.status = status
        self.response_headers.extend(headers)
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class EdgeChannel(HTTPChannel):
    """One client connection: read deadlines, lingering close."""

    task_class = EdgeTask
    error_task_class = EdgeErrorTask
    parser_class = EdgeParser

    def __init__(self, server, sock, addr, adj, map=None):
        self.waiting_since = time.monotonic()  # when the request being read started to count
        self.served = 0
        self.linger_until = None  # set while lingering before a close
        self.lingered_bytes = 0
        super().__init__(server, sock, addr, adj, map)

    # -- read deadlines
    def received(self, data: bytes):
        if self.request is None and self.served:
            self.waiting_since = time.monotonic()  # a keep-alive connection starts its next request
        return super().received(data)

    def service(self):
        request = self.requests[0]
        try:
            super().service()
        finally:
            self.server.release(request)  # if the task never ran (client gone)
            self.served += 1
            self.waiting_since = time.monotonic()  # a request read meanwhile gets its full time now

    def read_overdue(self, now: float) -> bool:
        """Is the request being read past its deadline?  Main thread, no task running."""
        request = self.request
        if request is None:  # nothing of a request yet: the first one is timed from accept
            return not self.served and now - self.waiting_since > self.server.header_timeout
        if not request.headers_finished:
            return now - self.waiting_since > self.server.header_timeout
        started = max(self.waiting_since, request.headers_done_at or now)
        return now - started > self.server.body_timeout

    def answer_timeout(self) -> None:
        """408 (JSON, through waitress's error task) and close."""
        timeout = self.parser_class(self.adj)
        timeout.parse_header(b"GET / HTTP/1.1\r\n")
        timeout.error = RequestTimeout("the request was not received in time")
        timeout.completed = True
        self.request = None
        self.requests.append(timeout)
        self.server.add_task(self)

    # -- lingering close
    def handle_write(self):
        if self.linger_until is not None:
            if self.will_close:  # the linger time is up
                self.handle_close()
            return
        if not self.close_when_flushed or self.will_close:
            return super().handle_write()
        # The answer says "close": flush it, but linger instead of closing when done.
        self.close_when_flushed = False
        super().handle_write()
        if not self.connected:
            return
        if self.total_outbufs_len or self.will_close:
            self.close_when_flushed = True  # more to flush (or closing after an error): as before
            return
        self.start_lingering()

    def start_lingering(self) -> None:
        try:
            self.socket.shutdown(socket.SHUT_WR)  # the client sees the answer end
        except OSError:
            self.handle_close()
            return
        self.linger_until = time.monotonic() + LINGER_S

    def readable(self):
        return self.linger_until is not None or super().readable()

    def handle_read(self):
        if self.linger_until is None:
            return super().handle_read()
        try:
            discarded = len(self.recv(LINGER_READ_BYTES))  # recv closes the channel on EOF
        except OSError:
            self.handle_close()
            return
        self.lingered_bytes += discarded
        if self.connected and self.lingered_bytes > LINGER_MAX_BYTES:
            self.handle_close()


class EdgeServer(TcpWSGIServer):
    """waitress's TCP server with the ops lane, the in-flight count and read deadlines."""

    channel_class = EdgeChannel

    def __init__(self, application, config: Config, adj: Adjustments, sock: socket.socket, in_flight: InFlight):
        self.ops_lane = ThreadedTaskDispatcher()
        self.ops_lane.set_thread_count(OPS_THREADS)
        self.refusal_lane = ThreadedTaskDispatcher()
        self.refusal_lane.set_thread_count(REFUSAL_THREADS)
        self.refusal_lane.queue_logger = QUIET_QUEUE_LOG
        self.in_flight = in_flight
        self.header_timeout = config.http_header_timeout
        self.body_timeout = config.http_body_timeout
        self.max_body_bytes = config.max_body_bytes  # for the 413 message of EdgeErrorTask
        super().__init__(application, _sock=sock, adj=adj, bind_socket=False,
                         sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))

    def add_task(self, channel: EdgeChannel) -> None:
        """Choose the lane of the channel's next request (called with its requests_lock held)."""
        request = channel.requests[0]
        if request.error:
            self.refusal_lane.add_task(channel)
        elif request.path in OPS_PATHS:
            self.ops_lane.add_task(channel)
        elif self.in_flight.try_acquire():
            request.counted = True
            self.task_dispatcher.add_task(channel)
        else:
            request.too_busy = True  # answered 429 by the app
            self.refusal_lane.add_task(channel)

    def release(self, request) -> None:
        # Called once by the task and once more by the channel: only the first counts.
        if getattr(request, "counted", False):
            request.counted = False
            self.in_flight.release()

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle keep-alive connections (channel_timeout)
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            if channel.linger_until is not None:
                if mono > channel.linger_until:
                    channel.will_close = True
                continue
            with channel.requests_lock:
                if (not channel.requests and not channel.will_close and not channel.close_when_flushed
                        and channel.read_overdue(mono)):
                    channel.answer_timeout()


# ---------------------------------------------------------------- serving
def raise_open_files_limit(wanted: int) -> None:
    """Every connection is a file descriptor; the usual soft limit (1024) is below
    HTTP_CONNECTION_LIMIT plus what the process needs besides."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            log.warning("open files limited to %d: fewer than HTTP_CONNECTION_LIMIT connections fit", target)


def create_server(application, config: Config) -> EdgeServer:
    """The server for the front end, every waitress limit set from `config`."""
    raise_open_files_limit(config.http_connection_limit + 256)
    sock = listening_socket(config)  # bound here (shared with the other front ends): OSError if taken
    in_flight = in_flight_count(config)
    # Each counted request holds a thread, a stream for its whole life.  Sharing the count, one
    # front end may hold all of it (the kernel may send it most connections): as many threads.
    threads = max(config.http_threads, in_flight.limit) if isinstance(in_flight, SharedInFlight) else config.http_threads
    adj = Adjustments(
        sockets=[sock],
        threads=threads,
        connection_limit=config.http_connection_limit,
        channel_timeout=config.http_idle_timeout,
        cleanup_interval=CLEANUP_INTERVAL_S,
        asyncore_use_poll=True,  # select() cannot watch file descriptors above 1023
        max_request_body_size=config.max_body_bytes + BODY_SLACK_BYTES,
        # Lets waitress read ahead on the connection, which is how it
        # notices a client that hung up (environ["waitress.client_disconnected"]).
        channel_request_lookahead=1,
        ident="moondream-server",
    )
    return EdgeServer(application, config, adj, sock, in_flight)
