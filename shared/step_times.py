"""How long each GPU scheduler step takes, as a histogram with fixed buckets.

The GPU worker times every step and sends the histogram in its heartbeat stats as flat numeric
keys (`step_seconds_le_0.01`: steps that took more than the bucket below and at most 10 ms),
so the broker adds them up over workers like any other counter, and the front end turns them
into `moondream_gpu_step_seconds` on /metrics.  A step that stalls (a long prefill, a slow
image encode, a GPU heading for GPU_STEP_TIMEOUT) then shows in the high buckets instead of
only as a lower rate of `moondream_gpu_steps_total`.
"""
from __future__ import annotations

import bisect

# A decode step of a small batch takes milliseconds on a GPU, tens on a CPU; a prefill of many
# images up to seconds; GPU_STEP_TIMEOUT (default 120 s) ends a worker whose step never returns.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BUCKET_KEYS = tuple(f"step_seconds_le_{bound:g}" for bound in STEP_BUCKETS) + ("step_seconds_le_inf",)
SUM_KEY = "step_seconds_sum"


class StepTimes:
    """Counts per bucket (not cumulative: sums over workers stay right) and the total time."""

    def __init__(self):
        self.counts = [0] * len(_BUCKET_KEYS)  # the last one: slower than the largest bucket
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
        self.total += seconds

    def as_stats(self) -> dict:
        return {**dict(zip(_BUCKET_KEYS, self.counts)), SUM_KEY: self.total}


def cumulative_buckets(stats: dict) -> tuple[list[tuple[str, int]], float] | None:
    """Heartbeat stats (one worker's, or the broker's sum) -> Prometheus' histogram buckets
    [(upper bound, steps at most that long), ..., ("+Inf", all steps)] and the total seconds;
    None when the stats hold no step times (no GPU worker has sent any yet)."""
    if SUM_KEY not in stats:
        return None
    bounds = [f"{bound:g}" for bound in STEP_BUCKETS] + ["+Inf"]
    buckets, running = [], 0
    for bound, key in zip(bounds, _BUCKET_KEYS):
        running += int(stats.get(key, 0))
        buckets.append((bound, running))
    return buckets, float(stats[SUM_KEY])
