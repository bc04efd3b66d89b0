"""`seed` and `variant` travel as typed fields of Submit and Generate, never as settings keys,
and the scheduler's free_slots() is never negative."""
from __future__ import annotations

import uuid

import pytest

from broker_client.client import BrokerClient
from gpu_worker.engine_types import EngineRequest
from gpu_worker.scheduler import Scheduler
from shared import protocol
from shared.protocol import Generate, Heartbeat, Result, Submit
from tests.engine_helpers import fixture_engine, fixture_image
from tests.stack import ProcessGroup, config_from_env, stack_env
from tests.test_broker_priority import FakeGpuWorker

pytestmark = pytest.mark.timeout(60)


def caption(**fields):
    return EngineRequest(uuid.uuid4().hex, "caption", {"length": "short"}, {"temperature": 0, "max_tokens": 4},
                         fixture_image("main", "small_96x64.png"), **fields)


def test_the_broker_hands_seed_and_variant_to_the_gpu_worker_as_fields(tmp_path):
    env = stack_env(tmp_path)
    config = config_from_env(env)
    group = ProcessGroup(env, tmp_path)
    group.start("broker", "broker")
    client = BrokerClient(config)
    try:
        gpu = FakeGpuWorker(config)
        stream = client.submit(Submit(request_id="r1", skill="query", params={"question": "q"},
                                      settings={"max_tokens": 5}, seed=42, variant="ft-alpha@100"))
        generates = []
        while not generates:  # FakeGpuWorker keeps ids only: read the Generate itself here
            gpu.socket.send_multipart(protocol.encode(Heartbeat(worker_id="fake-gpu", free=1)))
            if gpu.socket.poll(100):
                msg, _ = protocol.decode(gpu.socket.recv_multipart())
                if isinstance(msg, Generate):
                    generates.append(msg)
        generate = generates[0]
        assert (generate.seed, generate.variant, generate.settings) == (42, "ft-alpha@100", {"max_tokens": 5})
        gpu.socket.send_multipart(protocol.encode(Result("r1", {"answer": "ok"})))
        assert isinstance(list(stream)[-1], Result)
    finally:
        client.close()
        group.stop_all()


def test_a_submit_without_seed_or_variant_leaves_them_off_the_wire():
    frames = protocol.encode(Submit(request_id="r", skill="caption", params={}, settings={}))
    assert b"seed" not in frames[0] and b"variant" not in frames[0]  # omit_defaults: old peers see no change


@pytest.mark.parametrize("key", ["seed", "variant"])
def test_seed_or_variant_inside_settings_is_refused_not_popped(key):
    sched = Scheduler(fixture_engine("main"), max_batch=1)
    req = caption()
    req.settings[key] = 7 if key == "seed" else "ft-alpha@100"
    with pytest.raises(ValueError, match=f"unknown settings: {key}"):
        sched.add(req)
    assert not sched.has_work()


def test_the_seed_field_reaches_the_request_unchanged():
    sched = Scheduler(fixture_engine("main"), max_batch=1)
    req = caption(seed=11)
    sched.add(req)
    assert req.seed == 11 and set(req.settings) == {"temperature", "top_p", "max_tokens", "max_objects"}


def test_free_slots_is_never_negative_with_a_queue_longer_than_the_rows():
    sched = Scheduler(fixture_engine("main"), max_batch=1)
    for _ in range(3):
        sched.add(caption())
    assert sched.free_rows() == 1 and len(sched.waiting) == 3
    assert sched.free_slots() == 0
