"""Faults inside the scheduler give their slot back and leave others running."""
from __future__ import annotations

import uuid

from gpu_worker import programs as P
from gpu_worker.engine_types import EngineRequest
from gpu_worker.scheduler import Scheduler
from shared.protocol import CaptionParams, SamplingSettings
from tests.engine_helpers import assert_pool_holds_only_cached_images, fixture_engine, fixture_image, run_requests


def caption(max_tokens=4):
    return EngineRequest(uuid.uuid4().hex, "caption", CaptionParams(length="short"), SamplingSettings(temperature=0, max_tokens=max_tokens),
                         fixture_image("main", "small_96x64.png"))


def test_a_request_that_fails_to_start_returns_its_blocks(monkeypatch):
    sched = Scheduler(fixture_engine("main"), max_batch=2)
    real_start = P.start_program
    broken = caption()

    def start_program_failing_for_one(ctx, skill, params, settings, has_image):  # fault injection
        if params is broken.params:
            raise RuntimeError("injected: program could not start")
        return real_start(ctx, skill, params, settings, has_image)

    monkeypatch.setattr(P, "start_program", start_program_failing_for_one)
    good = caption()
    outcomes = run_requests(sched, [broken, good])
    assert "injected" in outcomes[broken.request_id].error
    assert outcomes[good.request_id].error is None
    assert sched.free_rows() == 2 and not sched.running
    assert_pool_holds_only_cached_images(sched)
    # both rows really usable again: two more requests run side by side
    again = [caption(), caption()]
    assert all(o.error is None for o in run_requests(sched, again).values())
