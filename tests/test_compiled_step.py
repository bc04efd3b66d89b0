"""COMPILE: the compiled decode step answers exactly as the eager one, and any failure
falls back to eager with one warning line.  The only test that compiles (one tiny model,
batch 1 text-only decode: one graph); the rest of the suite runs eagerly (COMPILE=auto
is off on the CPU)."""
from __future__ import annotations

import logging

import pytest
import torch

from gpu_worker import model as M
from gpu_worker.compiled_step import FakeCompileFailure, compile_wanted
from gpu_worker.engine import load_model
from gpu_worker.engine_types import EngineRequest
from gpu_worker.scheduler import Scheduler
from shared.config import Config, StartupError, load_config
from shared.protocol import QueryParams, SamplingSettings
from tests.engine_helpers import run_requests


def tiny_engine():
    return load_model(Config(model="random:tiny", device="cpu", dtype="float32"))


def text_query(rid: str, max_tokens: int = 12) -> EngineRequest:
    return EngineRequest(rid, "query", QueryParams(question="What is the number seven?"),
                         SamplingSettings(temperature=0, max_tokens=max_tokens))


def answer(engine, rid: str) -> dict:
    out = run_requests(Scheduler(engine, max_batch=2, context=256), [text_query(rid)])[rid]
    assert out.error is None
    return {"output": out.output, "finish": out.finish_reason, "tokens": out.metrics["output_tokens"]}


def test_compile_setting_auto_is_on_for_cuda_only(monkeypatch):
    assert compile_wanted("auto", torch.device("cuda")) and not compile_wanted("auto", torch.device("cpu"))
    assert compile_wanted("on", torch.device("cpu")) and not compile_wanted("off", torch.device("cuda"))
    assert tiny_engine().compiled is None  # the default on the CPU: eager, nothing compiles
    monkeypatch.setenv("COMPILE", "sometimes")
    with pytest.raises(StartupError, match="COMPILE"):
        load_config(exit_on_error=False)


def test_compile_failure_falls_back_to_eager_with_one_warning(caplog):
    engine = tiny_engine()
    eager = answer(engine, "eager")

    def fail():
        raise FakeCompileFailure("injected")

    engine.use_compiled_decode(fault=fail)
    with caplog.at_level(logging.WARNING, logger="gpu_worker"):
        first = answer(engine, "first")
        again = answer(engine, "again")
    assert first == eager and again == eager  # every step answered, by the eager forward
    warnings = [r for r in caplog.records if "compiled decode step failed" in r.getMessage()]
    assert len(warnings) == 1 and "FakeCompileFailure: injected" in warnings[0].getMessage()
    assert engine.compiled.broken and engine.compiled.compiled_calls == 0


def test_compiled_decode_equals_eager():
    engine = tiny_engine()
    eager = answer(engine, "eager")
    assert eager["tokens"] > 3  # decode steps ran, not just the prefill
    engine.use_compiled_decode()
    compiled = answer(engine, "compiled")
    assert not engine.compiled.broken
    steps = eager["tokens"] - 1 if eager["finish"] == "length" else eager["tokens"]  # decode steps after the prefill
    assert engine.compiled.compiled_calls == steps
    assert compiled == eager

    # bench/overhead.py's split of a compiled step: time inside the graph call, host time outside it
    from bench.overhead import GraphCallTimer, time_steps
    timer = GraphCallTimer(engine.compiled)
    step_times = time_steps(engine, 1, 3, timer)
    outside = timer.remove()
    assert len(timer.outside) == 3 and timer.total > 0 and not engine.compiled.broken
    assert 0 < outside < max(step_times)
    assert "_run" not in vars(engine.compiled)  # uninstalled: the class's method again

    # one step's hidden states, side by side: float32 within rounding
    sched = Scheduler(engine, max_batch=2, context=256)
    seq_kv = sched.cache.open_sequence(None, 32)
    sched.cache.grow(seq_kv, 9)
    layout = M.batch_layout(sched.cache, [seq_kv], [8], 1, split_prefixes=True)
    embeds = engine.embed_tokens([40]).view(1, 1, -1)
    with torch.inference_mode():
        want = M.text_forward(embeds, layout, sched.cache, engine.weights, engine.config, engine.rope)
        k_written = sched.cache.k[0][:, layout.write].clone()
        sched.cache.k[0][:, layout.write] = 0
        got = engine.compiled(embeds, layout, sched.cache, None)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sched.cache.k[0][:, layout.write], k_written)  # the graph wrote the pool in place
