"""A request's fields travel typed from the edge to the GPU worker: each skill's parameters as its
own struct, the sampling settings as one, `seed` and `variant` as fields of Submit and Generate
(never settings keys); a value out of range cannot be decoded.  Also: the scheduler's
free_slots() is never negative."""
from __future__ import annotations

import base64
import uuid

import msgspec
import pytest

from api import schemas
from api.models import ModelNames
from batch_worker import lines
from broker_client.client import BrokerClient
from gpu_worker.engine_types import EngineRequest
from gpu_worker.scheduler import Scheduler
from shared import protocol
from shared.config import Config
from shared.protocol import (CaptionParams, DetectParams, Generate, Heartbeat, PointParams, QueryParams, Result,
                             SamplingSettings, Submit)
from tests.engine_helpers import CONFORMANCE, fixture_engine, fixture_image
from tests.stack import ProcessGroup, config_from_env, stack_env
from tests.test_broker_priority import FakeGpuWorker

pytestmark = pytest.mark.timeout(60)


def caption(**fields):
    return EngineRequest(uuid.uuid4().hex, "caption", CaptionParams(length="short"), SamplingSettings(temperature=0, max_tokens=4),
                         fixture_image("main", "small_96x64.png"), **fields)


def test_the_broker_hands_seed_and_variant_to_the_gpu_worker_as_fields(tmp_path):
    env = stack_env(tmp_path)
    config = config_from_env(env)
    group = ProcessGroup(env, tmp_path)
    group.start("broker", "broker")
    client = BrokerClient(config)
    try:
        gpu = FakeGpuWorker(config)
        params = QueryParams(question="q", reasoning=True, spatial_refs=[[0.1, 0.2], [0.1, 0.2, 0.3, 0.4]])
        settings = SamplingSettings(top_p=0.25, max_tokens=5)
        stream = client.submit(Submit(request_id="r1", skill="query", params=params, settings=settings,
                                      seed=42, variant="ft-alpha@100"))
        generates = []
        while not generates:  # FakeGpuWorker keeps ids only: read the Generate itself here
            gpu.socket.send_multipart(protocol.encode(Heartbeat(worker_id="fake-gpu", free=1)))
            if gpu.socket.poll(100):
                msg, _ = protocol.decode(gpu.socket.recv_multipart())
                if isinstance(msg, Generate):
                    generates.append(msg)
        generate = generates[0]
        assert (generate.seed, generate.variant) == (42, "ft-alpha@100")
        assert (generate.params, generate.settings) == (params, settings)  # typed, unchanged by the broker
        gpu.socket.send_multipart(protocol.encode(Result("r1", {"answer": "ok"})))
        assert isinstance(list(stream)[-1], Result)
    finally:
        client.close()
        group.stop_all()


def test_a_submit_without_seed_or_variant_leaves_them_off_the_wire():
    frames = protocol.encode(Submit(request_id="r", skill="caption", params=CaptionParams()))
    assert b"seed" not in frames[0] and b"variant" not in frames[0]  # omit_defaults: old peers see no change


def raw_generate(params: dict, settings: dict, skill: str = "query") -> list:
    """A Generate's frames built from plain dicts, as a peer that skipped the edge might send them."""
    return [msgspec.msgpack.encode({"type": "Generate", "request_id": "r", "skill": skill, "params": params,
                                    "settings": settings})]


def test_a_well_formed_raw_generate_decodes_to_the_typed_structs():
    msg, _ = protocol.decode(raw_generate({"skill": "query", "question": "q", "reasoning": False}, {"top_p": 0.5}))
    assert (msg.params, msg.settings) == (QueryParams(question="q", reasoning=False), SamplingSettings(top_p=0.5))


@pytest.mark.parametrize("params,settings,skill,error", [
    ({"skill": "query", "question": "q"}, {"seed": 7}, "query", "unknown field `seed`"),
    ({"skill": "query", "question": "q"}, {"variant": "ft-alpha@100"}, "query", "unknown field `variant`"),
    ({"skill": "query", "question": "q"}, {"max_tokens": 0}, "query", "max_tokens"),
    ({"skill": "query", "question": "q"}, {"max_objects": 0}, "query", "max_objects"),
    ({"skill": "query", "question": "q"}, {"top_p": 2.0}, "query", "top_p"),
    ({"skill": "query", "question": "q"}, {"temperature": -1.0}, "query", "temperature"),
    ({"skill": "query", "question": "q", "spatial_refs": [[2, 2]]}, {}, "query", "spatial_refs"),
    ({"skill": "query", "question": "q", "spatial_refs": [[0.1]]}, {}, "query", "spatial_refs"),
    ({"skill": "query"}, {}, "query", "question"),
    ({"skill": "caption", "length": "huge"}, {}, "caption", "length"),
    ({"skill": "caption", "length": "short", "question": "q"}, {}, "caption", "unknown field `question`"),
    ({"skill": "detect", "object": 3}, {}, "detect", "object"),
    ({"skill": "paint"}, {}, "caption", "paint"),
    ({"skill": "query", "question": "q"}, {}, "caption", "skill 'caption' carries QueryParams"),
])
def test_a_generate_out_of_range_or_mislabelled_cannot_be_decoded(params, settings, skill, error):
    with pytest.raises(msgspec.ValidationError, match=error):
        protocol.decode(raw_generate(params, settings, skill))


def test_the_scheduler_fills_the_settings_left_out_and_keeps_the_seed_field():
    sched = Scheduler(fixture_engine("main"), max_batch=1)
    req = caption(seed=11)
    sched.add(req)
    assert req.seed == 11
    assert req.settings == SamplingSettings(temperature=0, top_p=0.3, max_tokens=4, max_objects=50)


@pytest.mark.parametrize("route,body,params", [
    (schemas.CaptionRequest, {"image_url": "x", "length": "short"}, CaptionParams(length="short")),
    (schemas.QueryRequest, {"question": "q?", "image_url": "x", "spatial_refs": [[0.5, 0.5]]},
     QueryParams(question="q?", spatial_refs=[[0.5, 0.5]])),
    (schemas.DetectRequest, {"image_url": "x", "object": "cat"}, DetectParams(object="cat")),
    (schemas.PointRequest, {"image_url": "x", "object": "cat"}, PointParams(object="cat")),
])
def test_the_edge_builds_each_skills_struct_and_only_the_settings_given(route, body, params):
    request = msgspec.convert({**body, "settings": {"temperature": 0.2, "variant": "ft-alpha@100"}}, route)
    assert request.check(Config()) == (params, SamplingSettings(temperature=0.2))


def test_a_batch_point_line_carries_point_params():
    image = base64.b64encode(open(f"{CONFORMANCE}/main/images/small_96x64.png", "rb").read()).decode()
    raw = msgspec.json.encode({"skill": "point", "image": image, "object": "cat", "settings": {"max_objects": 3}})
    submit, _ = lines.to_submit(raw, "r", Config(), ModelNames(Config()))
    assert (submit.params, submit.settings) == (PointParams(object="cat"), SamplingSettings(max_objects=3))


def test_free_slots_is_never_negative_with_a_queue_longer_than_the_rows():
    sched = Scheduler(fixture_engine("main"), max_batch=1)
    for _ in range(3):
        sched.add(caption())
    assert sched.free_rows() == 1 and len(sched.waiting) == 3
    assert sched.free_slots() == 0
