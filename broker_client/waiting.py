"""Waiting for a request's events: the deadline, the grace period, the client who hung up."""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

from shared import protocol

# How often a request thread looks whether its HTTP client hung up.
DISCONNECT_POLL_S = 0.5
# The broker answers 504 itself at the deadline; this only covers a broker that
# never answers at all.
DEADLINE_GRACE_S = 2.0


def wait_events(stream, deadline: float, client_gone: Optional[Callable[[], bool]]) -> Iterator:
    """Yield a request's events up to and including its Result or Error.

    Every DISCONNECT_POLL_S it looks whether the HTTP client hung up (waitress
    tells us through `client_gone`) and if so cancels the work and ends with an
    Error 499.  It looks on a clock, not only when the broker is quiet, because
    text chunks can keep arriving for a request that is not streamed.  A
    broker silent past the deadline ends it with an Error 504."""
    next_look = time.monotonic() + DISCONNECT_POLL_S
    while True:
        remaining = deadline + DEADLINE_GRACE_S - time.time()
        if remaining <= 0:
            stream.cancel()
            yield protocol.Error(request_id=stream.request_id, status=504, code="timeout",
                                 message="the request took longer than the server allows")
            return
        try:
            event = stream.next_event(timeout=min(DISCONNECT_POLL_S, remaining))
        except TimeoutError:
            pass
        else:
            yield event
            if isinstance(event, (protocol.Result, protocol.Error)):
                return
        if client_gone is not None and time.monotonic() >= next_look:
            next_look = time.monotonic() + DISCONNECT_POLL_S
            if client_gone():
                stream.cancel()
                yield protocol.Error(request_id=stream.request_id, status=499,
                                     code="client_disconnected", message="the client went away")
                return
