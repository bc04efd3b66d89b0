"""The heartbeat clock both ends of a broker connection keep (the Paranoid Pirate pattern):
send a heartbeat every `interval`, and count the peer gone after `expiry` seconds without a
word from it.  shared/broker_link.py (the workers) and broker_client/ (front ends, the batch
worker) use this one clock; what they do about a silent broker differs (a worker reconnects
and registers again, a client fails the requests it had sent)."""
from __future__ import annotations

import time


class Liveness:
    def __init__(self, interval: float, expiry: float):
        self.interval, self.expiry = interval, expiry
        self.last_heard = time.monotonic()
        self.next_beat = 0.0  # due at once: the first heartbeat goes out with the first look

    def heard(self) -> None:
        """Anything from the peer counts: it is alive."""
        self.last_heard = time.monotonic()

    def restart(self, first_beat_in: float = 0.0) -> None:
        """A new connection: silence counts from now."""
        now = time.monotonic()
        self.last_heard, self.next_beat = now, now + first_beat_in

    def beat_due(self, now: float) -> bool:
        """True once per interval: time to send a heartbeat."""
        if now < self.next_beat:
            return False
        self.next_beat = now + self.interval
        return True

    def silent_for(self, now: float) -> float:
        return now - self.last_heard

    def gone(self, now: float) -> bool:
        return self.silent_for(now) > self.expiry
