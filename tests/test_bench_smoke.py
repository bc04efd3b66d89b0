"""The engine benchmarks run end to end in their small modes and print their
tables, so they keep working as the engine changes (the real runs take minutes
on a CPU and need full-size weights; these take seconds)."""
from __future__ import annotations

import json

import pytest
import torch

from bench import engine as engine_bench
from bench import throughput as throughput_bench


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine, threads waiting on each other make
    these tiny models' many small ops many times slower.  Restored afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_engine_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "engine.json"
    results = engine_bench.main(["--model", "random:tiny", "--device", "cpu", "--quick", "--threads", "1",
                                  "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| what | measured ms |" in printed
    assert "image encode, 2 crops" in printed and "prompt prefill" in printed and "decode step, batch 2" in printed
    saved = json.loads(out.read_text())
    assert [r["what"] for r in saved["rows"]] == [r["what"] for r in results["rows"]]
    for row in saved["rows"]:
        assert row["ms"] > 0 and row["gflop"] > 0 and row["gbytes"] > 0 and 0 < row["fraction_of_floor"]
    assert saved["peaks"]["matmul_flops_per_s"] > 0 and saved["peaks"]["bandwidth_bytes_per_s"] > 0


def test_throughput_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    throughput_bench.main(["--device", "cpu", "--small", "--quick", "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| workload | concurrency | KV slots | requests | req/s |" in printed
    saved = json.loads(out.read_text())
    points = {(r["workload"], r["concurrency"]) for r in saved["rows"]}
    assert points == {("kestrel-3tok", 1), ("kestrel-3tok", 2), ("answer-30tok", 1), ("answer-30tok", 2)}
    for row in saved["rows"]:
        assert row["requests"] >= 1 and row["req_per_s"] > 0
        # greedy on random weights may stop early at the end-of-text token, never late
        assert 1 <= row["mean_output_tokens"] <= row["max_tokens"]
        assert row["flop_fraction"] > 0 and row["memory_fraction"] > 0
