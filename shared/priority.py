"""The one priority policy: batch lines (protocol.BACKGROUND) yield to interactive requests.

The broker (its preprocess and GPU queues, its dispatch) and the GPU worker's scheduler (its
waiting queue, its admission) both decide by these functions, so the two cannot drift apart.
While interactive requests come, the broker also narrows how many batch lines it lets onto a
GPU worker whose model runs on the CPU (`InteractiveTraffic`, `narrows_on`): there every row
slows a step down, and every line in flight costs the other processes CPU time that interactive
requests wait for.  On a GPU a step of 8 rows costs about what one of 24 does: no narrowing.
The batch worker only marks its lines BACKGROUND when it submits them; it asks nobody whether
interactive requests are running."""
from __future__ import annotations

from typing import Callable, MutableSequence, TypeVar

from shared.protocol import INTERACTIVE

T = TypeVar("T")


def is_background(priority: int) -> bool:
    """A batch line's priority (protocol.BACKGROUND or lower)."""
    return priority < INTERACTIVE


# Interactive requests a second or so apart keep batch lines narrowed between them too, not
# only during each one's few tens of milliseconds.
INTERACTIVE_LINGER_S = 2.0


def background_slots(capacity: int, interactive: bool = False) -> int:
    """How many of a GPU worker's `capacity` slots batch lines may hold at once: all but a
    quarter (at least one is kept for interactive requests, unless there is only one); while
    `interactive` requests come, an eighth (at least one)."""
    wide = capacity - min(capacity - 1, max(1, capacity // 4))
    return min(wide, max(1, capacity // 8)) if interactive else wide


def narrows_on(device: str) -> bool:
    """Whether batch lines narrow on a worker whose model runs on `device` (its Ready.model)."""
    return device.startswith("cpu")


class InteractiveTraffic:
    """Whether interactive requests are coming: one is in flight, or one came or ended less than
    INTERACTIVE_LINGER_S ago.  The broker tells it about each interactive request."""

    def __init__(self):
        self.in_flight = 0
        self.last_seen = float("-inf")

    def started(self, now: float) -> None:
        self.in_flight += 1
        self.last_seen = now

    def ended(self, now: float) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.last_seen = now

    def present(self, now: float) -> bool:
        return self.in_flight > 0 or now - self.last_seen < INTERACTIVE_LINGER_S


def enqueue(queue: MutableSequence[T], item: T, priority: int, priority_of: Callable[[T], int]) -> None:
    """Append `item`, but ahead of every waiting entry of lower priority: an interactive
    request never waits behind a bulk job, and batch lines keep their arrival order.
    Lower-priority entries sit at the tail, so the scan from the end is short."""
    position = len(queue)
    while position > 0 and priority_of(queue[position - 1]) < priority:
        position -= 1
    queue.insert(position, item)
