"""The engine benchmarks run end to end in their small modes and print their
tables, so they keep working as the engine changes (the real runs take minutes
on a CPU and need full-size weights; these take seconds)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from bench import engine as engine_bench
from bench import overhead as overhead_bench
from bench import throughput as throughput_bench
from tests.stack import REPO


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


def test_overhead_benchmark_runs(tmp_path, capsys):
    """bench/overhead.py --quick --baseline none: this tree's steady decode steps at batch 1
    and 8 (a subprocess, one torch thread), with kernels per step from the profiler."""
    out = tmp_path / "overhead.json"
    results = overhead_bench.main(["--quick", "--baseline", "none", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| batch | tree | step ms" in printed
    assert json.loads(out.read_text()) == results
    for batch in ("1", "8"):
        row = results[batch]["this"]
        assert row["step_s"] > 0 and row["kernels"] > 24 and 0 <= row["outside_kernels_share"] <= 1
        # the kernels alone (linears, attentions) take part of a whole step, never more than all of it
        assert 0 < results[batch]["kernel_floor"]["step_s"] < 2 * row["step_s"]
        # one streaming read of the weights is below the kernels that read them one linear at a time
        assert 0 < row["weight_read_s"] < results[batch]["kernel_floor"]["step_s"]
    assert "| kernel floor |" in printed and "the memory floor of a batch-1 step" in printed


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


def test_variants_benchmark_runs(tmp_path, capsys):
    from bench import variants as variants_bench

    out = tmp_path / "variants.json"
    result = variants_bench.main(["--model", "random:tiny", "--quick", "--threads", "1", "--json", str(out)])
    assert "| decode step, batch 4 | median ms | ratio | median CPU ms | CPU ratio |" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["ratio"] == result["ratio"] > 0 and len(saved["base_s"]) == len(saved["adapters_s"]) == 2


def test_int8_benchmark_runs(tmp_path, capsys):
    from bench import int8 as int8_bench

    out = tmp_path / "int8.json"
    result = int8_bench.main(["--model", "random:tiny", "--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| batch-1 decode step (CPU ms) |" in printed and "| conformance main |" in printed
    saved = json.loads(out.read_text())
    assert saved["decode_speedup"] == result["decode_speedup"] > 0 and saved["memory_ratio"] > 0
    for fid in saved["fidelity"].values():
        assert fid["requests"] >= 1 and 0 <= fid["token_agreement"] <= 1 and fid["logit_rel_err_max"] >= 0


def test_md3_benchmark_runs(tmp_path, capsys):
    from bench import md3 as md3_bench

    out = tmp_path / "md3.json"
    result = md3_bench.main(["--md3", "random:md3-tiny", "--md2", "random:tiny", "--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| batch | MD2 ms/step |" in printed and "batch-1 decode step" in printed
    saved = json.loads(out.read_text())
    assert saved["md3_over_md2_batch1"] == result["md3_over_md2_batch1"] > 0
    assert saved["results"]["md3"]["family"] == "moondream3" and saved["results"]["md2"]["family"] == "moondream2"
    assert set(saved["median_ms"]["md3"]) == {"1", "8", "32"} and saved["results"]["md3"]["rss_weights_bytes"] > 0


@pytest.mark.timeout(300)
def test_ceiling_benchmark_runs(tmp_path, capsys):
    from bench import ceiling

    out = tmp_path / "ceiling.json"
    result = ceiling.main(["--requests", "4", "--warmup", "1", "--repeats", "1", "--cores", "16", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| process type | processes | CPU ms per request |" in printed and "ceiling: " in printed
    saved = json.loads(out.read_text())
    assert set(saved["cpu_ms_per_request"]) == {"frontend", "broker", "preprocess", "gpu_worker"}
    assert all(ms > 0 for ms in saved["cpu_ms_per_request"].values())
    assert saved["ceiling_rps"] == result["ceiling_rps"] == min(limit["rps"] for limit in saved["limits"])
    assert 350_000 <= saved["jpeg_bytes"] <= 450_000


@pytest.mark.timeout(300)
def test_batch_benchmark_runs(tmp_path, capsys):
    """bench/batch.py on its own stack, both measurements at a few lines and seconds."""
    from bench import batch as batch_bench

    out = tmp_path / "batch.json"
    result = batch_bench.main(["--lines", "4", "--max-tokens", "2", "--concurrency", "2", "--rate", "2",
                               "--seconds", "2", "--fairness-lines", "40", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "throughput: HTTP" in printed and "fairness: interactive p50" in printed
    saved = json.loads(out.read_text())
    assert saved["throughput"]["ratio"] == result["throughput"]["ratio"] > 0
    assert saved["throughput"]["job_failed_lines"] == saved["throughput"]["http_errors"] == 0
    assert saved["fairness"]["p50_ratio"] > 0
    assert saved["setup"]["code"] and saved["setup"]["machine"] and saved["settings"]["lines"] == 4


def test_stop_match_benchmark_runs(capsys):
    from bench import stop_match

    result = stop_match.main(["--quick"])
    assert result["worst_ms"] > 0 and result["ordinary_ms"] > 0
    assert "characters that every piece may start" in capsys.readouterr().out


def test_kv_benchmark_runs(tmp_path, capsys):
    """The pool against the slot design, which it runs from its baseline commit in a git worktree."""
    from bench import kv as kv_bench

    has_baseline = subprocess.run(["git", "cat-file", "-e", kv_bench.BASELINE + "^{commit}"], cwd=REPO,
                                  capture_output=True).returncode == 0
    if not has_baseline:  # a shallow clone: the slot design's commit is not in this checkout's history
        pytest.skip(f"commit {kv_bench.BASELINE} (the slot design) is not in this clone's history")

    out = tmp_path / "kv.json"
    result = kv_bench.main(["--model", "random:tiny", "--quick", "--batches", "2", "--context", "760",
                            "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| measure | slot design" in printed and "decode step CPU ms, batch 2" in printed
    saved = json.loads(out.read_text())
    assert saved["rows"] == [list(r) for r in result["rows"]]
    fit, fit_one_image, held = (row[3] for row in saved["rows"][:3])
    assert fit > 1 and fit_one_image > fit and 0 < held < 1


def test_http_overhead_benchmark_runs(tmp_path, capsys):
    """bench/http_overhead.py --quick --baseline none: the 24-layer tiny-width checkpoint served
    by the real stack; the GPU worker's CPU time per generated token, read from /proc."""
    from bench import http_overhead

    out = tmp_path / "http_overhead.json"
    results = http_overhead.main(["--quick", "--baseline", "none", "--json", str(out)])
    assert "| workload | in flight | tree | CPU ms/token |" in capsys.readouterr().out
    assert json.loads(out.read_text()) == results
    for flight in ("1", "32"):
        row = results["image"][flight]["this"]
        assert row["tokens"] > 0 and row["cpu_ms_per_token"] > 0
