"""bench/load.py's bookkeeping, without a stack: what the warm-up sends and how the
per-token and per-chunk latencies are computed."""
from __future__ import annotations

from bench import load


def test_load_warmup_never_sends_a_timed_image():
    """bench/load.py warms up on its own images, so no timed request finds its image
    already encoded by the warm-up (in either workload, with or without distinct images)."""
    for workload in ("decode-heavy", "mixed"):
        for distinct in (False, True):
            timed = {body["image_url"] for _, body in load.make_requests(workload, 12, 0, distinct)}
            warmup = {body["image_url"] for _, body in
                      load.make_requests(workload, 8, 1, distinct, image_seeds=load.WARMUP_IMAGE_SEEDS)}
            assert timed and warmup and not timed & warmup, (workload, distinct)


def test_load_reports_time_per_output_token_apart_from_chunk_gaps():
    # 11 tokens in 3 chunks: first chunk at 0.2 s, done at 1.2 s
    sample = load.Sample(True, 200, latency=1.2, ttft=0.2, chunk_gaps=[0.4, 0.6], output_tokens=11)
    row = load.summarize([sample], elapsed=1.2)
    assert row["tpot_p50_ms"] == 100.0  # (1.2 - 0.2) / (11 - 1)
    assert row["chunk_gap_p50_ms"] == 400.0 and row["chunk_gap_p99_ms"] == 600.0
