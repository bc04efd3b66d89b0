"""The one priority policy: batch lines (protocol.BACKGROUND) yield to interactive requests.

The broker (its preprocess and GPU queues, its dispatch) and the GPU worker's scheduler (its
waiting queue, its admission) both decide by these functions, so the two cannot drift apart.
The batch worker only marks its lines BACKGROUND when it submits them; it asks nobody whether
interactive requests are running."""
from __future__ import annotations

from typing import Callable, MutableSequence, TypeVar

from shared.protocol import INTERACTIVE

T = TypeVar("T")


def is_background(priority: int) -> bool:
    """A batch line's priority (protocol.BACKGROUND or lower)."""
    return priority < INTERACTIVE


def background_slots(capacity: int) -> int:
    """How many of a GPU worker's `capacity` slots batch lines may hold at once: all but a
    quarter (at least one is kept for interactive requests, unless there is only one)."""
    return capacity - min(capacity - 1, max(1, capacity // 4))


def enqueue(queue: MutableSequence[T], item: T, priority: int, priority_of: Callable[[T], int]) -> None:
    """Append `item`, but ahead of every waiting entry of lower priority: an interactive
    request never waits behind a bulk job, and batch lines keep their arrival order.
    Lower-priority entries sit at the tail, so the scan from the end is short."""
    position = len(queue)
    while position > 0 and priority_of(queue[position - 1]) < priority:
        position -= 1
    queue.insert(position, item)
