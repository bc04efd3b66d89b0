"""Batching must not change answers: several images and prompts decoded together
give exactly what each gives alone, also when requests join a running batch."""
from __future__ import annotations

import time
import uuid

import pytest

from gpu_worker.engine_types import EngineRequest, Finished
from gpu_worker.scheduler import PromptTooLong, Scheduler
from shared.protocol import BACKGROUND, CaptionParams, DetectParams, QueryParams, SamplingSettings
from tests.engine_helpers import (KV_LAYOUT_IDS, KV_LAYOUTS, fixture_engine, fixture_image, run_requests, sampling,
                                  skill_params)

IMAGES = ["small_96x64.png", "landscape_800x600.png", "tall_300x1500.png", "photo_773x767.jpg", "wide_1920x1080.png"]


def mixed_requests():
    """Different skills, images, prompt lengths and settings (greedy and seeded sampling)."""
    specs = [
        ("caption", {"length": "short"}, {"temperature": 0, "max_tokens": 12}),
        ("caption", {"length": "long"}, {"temperature": 0.7, "top_p": 0.9, "max_tokens": 20}),
        ("query", {"question": "What is in the image?"}, {"temperature": 0, "max_tokens": 10}),
        ("query", {"question": "How many?", "reasoning": True}, {"temperature": 0, "max_tokens": 8}),
        ("query", {"question": "Where?", "spatial_refs": [[0.2, 0.3], [0.1, 0.1, 0.5, 0.6]]}, {"temperature": 1.0, "top_p": 0.5, "max_tokens": 9}),
        ("detect", {"object": "cat"}, {"max_objects": 3}),
        ("point", {"object": "red sofa"}, {"max_objects": 4}),
        ("caption", {"length": "normal"}, {"temperature": 0, "max_tokens": 30}),
    ]
    reqs = []
    for i, (skill, params, settings) in enumerate(specs):
        image = fixture_image("main", IMAGES[i % len(IMAGES)])
        reqs.append(EngineRequest(uuid.uuid4().hex, skill, skill_params(skill, params), sampling(settings), image,
                                  seed=1000 + i))
    reqs.append(EngineRequest(uuid.uuid4().hex, "query", QueryParams(question="Hello there"), SamplingSettings(temperature=0, max_tokens=7), None, seed=7))
    return reqs


def clone(req: EngineRequest) -> EngineRequest:
    return EngineRequest(uuid.uuid4().hex, req.skill, req.params, req.settings, req.image, req.seed)


def summary(outcome):
    return outcome.output, outcome.finish_reason, outcome.chunks, outcome.error


@pytest.fixture(scope="module")
def model_set(request):
    """Moondream 2's and Moondream 3's fixture models (MoE rows are grouped by expert per step)."""
    return request.param


# Every KV layout on Moondream 2; Moondream 3 on the default one and the GPU's gather (the odd
# block size checks block arithmetic, which does not depend on the model: once is enough).
MODEL_LAYOUTS = [("main", *layout) for layout in KV_LAYOUTS] + [("md3-main", *layout) for layout in KV_LAYOUTS[:2]]
MODEL_LAYOUT_IDS = [f"main-{i}" for i in KV_LAYOUT_IDS] + [f"md3-main-{i}" for i in KV_LAYOUT_IDS[:2]]


@pytest.fixture(scope="module")
def serial_answers(model_set):
    engine = fixture_engine(model_set)
    answers = []
    for req in mixed_requests():
        sched = Scheduler(engine, max_batch=1)
        answers.append(summary(run_requests(sched, [req])[req.request_id]))
    return answers


@pytest.mark.parametrize("model_set,block_size,attention", MODEL_LAYOUTS, ids=MODEL_LAYOUT_IDS, indirect=["model_set"])
def test_batched_equals_serial(model_set, serial_answers, block_size, attention):
    sched = Scheduler(fixture_engine(model_set), max_batch=16, block_size=block_size, attention=attention)
    reqs = mixed_requests()
    outcomes = run_requests(sched, reqs)
    assert [summary(outcomes[r.request_id]) for r in reqs] == serial_answers
    assert all(a[3] is None for a in serial_answers)


@pytest.mark.parametrize("model_set,block_size,attention", MODEL_LAYOUTS, ids=MODEL_LAYOUT_IDS, indirect=["model_set"])
def test_requests_joining_a_running_batch_equal_serial(model_set, serial_answers, block_size, attention):
    """Continuous batching: add requests while others are mid-generation."""
    sched = Scheduler(fixture_engine(model_set), max_batch=4, block_size=block_size, attention=attention)  # rows < requests
    reqs = mixed_requests()
    results = {}
    pending = list(reqs)
    chunks = {r.request_id: [] for r in reqs}
    step = 0
    while pending or sched.has_work():
        if pending and step % 3 == 0:
            sched.add(pending.pop(0))
        for ev in sched.step():
            if hasattr(ev, "text"):
                chunks[ev.request_id].append(ev.text)
            elif hasattr(ev, "output"):
                results[ev.request_id] = (ev.output, ev.finish_reason, chunks[ev.request_id], None)
            else:
                results[ev.request_id] = (None, None, chunks[ev.request_id], ev.message)
        step += 1
    assert [results[r.request_id] for r in reqs] == serial_answers


def test_three_questions_one_image_encode_it_once():
    engine = fixture_engine("main")
    sched = Scheduler(engine, max_batch=4)
    image = fixture_image("main", "photo_773x767.jpg")
    reqs = [EngineRequest(uuid.uuid4().hex, "query", QueryParams(question=q), SamplingSettings(temperature=0, max_tokens=5), image)
            for q in ("What is it?", "What colour?", "How many?")]
    first = run_requests(sched, reqs[:1])
    rest = run_requests(sched, reqs[1:])
    assert sched.stats()["image_encodes"] == 1
    assert first[reqs[0].request_id].metrics["image_cache_hit"] is False
    assert all(rest[r.request_id].metrics["image_cache_hit"] for r in reqs[1:])


def test_abort_frees_the_slot_and_others_continue():
    sched = Scheduler(fixture_engine("main"), max_batch=2)
    image = fixture_image("main", "small_96x64.png")
    a = EngineRequest("a", "caption", CaptionParams(length="long"), SamplingSettings(temperature=0, max_tokens=50), image)
    b = EngineRequest("b", "caption", CaptionParams(length="short"), SamplingSettings(temperature=0, max_tokens=5), image)
    sched.add(a)
    sched.add(b)
    sched.step()
    sched.step()
    sched.abort("a")
    assert sched.free_slots() == 1
    finished = []
    while sched.has_work():
        finished += [ev.request_id for ev in sched.step() if hasattr(ev, "output")]
    assert finished == ["b"]


# Values out of range (max_tokens 0, top_p 2, a length "huge") cannot reach the scheduler: the wire
# types refuse them (tests/test_wire_fields.py); what is left is what only the model can judge.
@pytest.mark.parametrize("bad", [
    dict(skill="detect", params=DetectParams(object="cat"), image=None),
    dict(skill="query", params=QueryParams(question="q", spatial_refs=[[0.2, 0.2]]), image=None),
    dict(skill="caption", params=QueryParams(question="q")),
    dict(skill="paint", params=CaptionParams()),
])
def test_invalid_requests_are_refused(bad):
    sched = Scheduler(fixture_engine("main"), max_batch=1)
    req = EngineRequest("x", bad["skill"], bad["params"], SamplingSettings(),
                        bad.get("image", fixture_image("main", "small_96x64.png")))
    with pytest.raises(ValueError):
        sched.add(req)


def test_context_overflow_ends_with_length():
    """A generation that would run past the cache's context stops cleanly."""
    sched = Scheduler(fixture_engine("main"), max_batch=1, context=760)
    image = fixture_image("main", "small_96x64.png")
    req = EngineRequest("c", "caption", CaptionParams(length="short"), SamplingSettings(temperature=0, max_tokens=100), image)
    out = run_requests(sched, [req])["c"]
    assert out.error is None and out.finish_reason == "length"
    assert out.metrics["output_tokens"] <= 760 - 730


@pytest.mark.parametrize("model_name,block_size,attention", MODEL_LAYOUTS, ids=MODEL_LAYOUT_IDS)
def test_shared_image_prefix_read_in_place_equals_serial(model_name, block_size, attention):
    """Sequences on one image share its prefix blocks (referenced, never copied); answers are unchanged."""
    engine = fixture_engine(model_name)
    image = fixture_image("main", "landscape_800x600.png")

    def requests():
        return [EngineRequest(f"s{i}", skill, skill_params(skill, params), SamplingSettings(temperature=0, max_tokens=12, max_objects=3), image)
                for i, (skill, params) in enumerate([
                    ("caption", {"length": "short"}), ("query", {"question": "What is it?"}),
                    ("query", {"question": "Why?", "reasoning": True}), ("detect", {"object": "cat"}),
                    ("point", {"object": "dog"}), ("caption", {"length": "long"})])]

    serial = {}
    for req in requests():
        serial[req.request_id] = summary(run_requests(Scheduler(engine, max_batch=1), [req])[req.request_id])
    sched = Scheduler(engine, max_batch=8, block_size=block_size, attention=attention)
    batched = run_requests(sched, requests())
    assert {rid: summary(o) for rid, o in batched.items()} == serial
    assert sched.stats()["image_encodes"] == 1


def test_split_softmax_attention_equals_full_attention():
    """The shared-prefix attention (prefix part + own part, merged) is plain attention, both
    ways: the CPU kernel's plan with an image shared by two rows, a row alone on its image
    (its own positions gathered by themselves) and rows without an image."""
    import torch
    import torch.nn.functional as F

    from gpu_worker.model import LoneRow, SplitPlan, _attention_with_shared_prefixes, _attention_with_shared_prefixes_cpu

    gen = torch.Generator().manual_seed(0)
    b, h, t, d, p, slot = 5, 2, 3, 16, 40, 9
    q = torch.randn(b, h, t, d, generator=gen)
    # a pool: image A at positions 0..p-1 (rows 0 and 2), image B at p..2p-1 (row 4 alone),
    # then the rows' own positions, scattered
    k_pool, v_pool = torch.randn(h, 2 * p + b * slot, d, generator=gen), torch.randn(h, 2 * p + b * slot, d, generator=gen)
    own = (2 * p + torch.randperm(b * slot, generator=gen)).view(b, slot)
    images = [(slice(0, p), [0, 2]), (slice(p, 2 * p), [4])]  # rows 1 and 3 read no prefix
    mask = torch.rand(b, 1, t, slot, generator=gen) > 0.3
    mask[..., 0] = True
    k_slot, v_slot = k_pool[:, own].transpose(0, 1), v_pool[:, own].transpose(0, 1)  # (B, H, slot, D)
    parts = [(k_pool[:, where], v_pool[:, where], torch.tensor(rows)) for where, rows in images]
    got = _attention_with_shared_prefixes(q, k_slot, v_slot, mask, parts)
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    rest = [0, 1, 2, 3]
    plan = SplitPlan(lone=[LoneRow(row=4, prefix=slice(p, 2 * p), own=own[4], bias=bias[4:5])], rest=rest,
                     rest_read=own[rest], rest_bias=bias[rest], shared=[images[0]])
    space = (torch.empty(h * b * slot * d), torch.empty(h * b * slot * d))
    got_cpu = _attention_with_shared_prefixes_cpu(q, k_pool, v_pool, plan, space)
    assert torch.allclose(got_cpu, got, atol=1e-5, rtol=1e-5)  # the CPU kernel's way (merged by log-sum-exp)
    prefix_of = {row: where for where, rows in images for row in rows}
    k_full = torch.stack([torch.cat([k_pool[:, prefix_of.get(r, slice(0, p))], k_slot[r]], dim=1) for r in range(b)])
    v_full = torch.stack([torch.cat([v_pool[:, prefix_of.get(r, slice(0, p))], v_slot[r]], dim=1) for r in range(b)])
    in_image = torch.tensor([r in prefix_of for r in range(b)]).view(b, 1, 1, 1)  # rows 1, 3: no prefix columns
    full_mask = torch.cat([in_image.expand(b, 1, t, p), mask], dim=-1)
    want = F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=full_mask)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_engine_tracks_float32_reference():
    """The serving dtype on GPUs is bf16: it must stay close to the float32 reference."""
    import json
    import os

    import torch
    from safetensors.torch import load_file

    from gpu_worker.engine import load_model
    from shared.config import Config
    from tests.engine_helpers import CONFORMANCE, request_from_case

    engine = load_model(Config(model=os.path.join(CONFORMANCE, "main"), device="cpu", dtype="bfloat16"))
    with open(os.path.join(CONFORMANCE, "main", "expected.json")) as f:
        case = json.load(f)["cases"][0]
    sched = Scheduler(engine, max_batch=1)
    req = request_from_case(case, fixture_image("main", case["image"]))
    out = run_requests(sched, [req], record=True)[req.request_id]
    ref = load_file(os.path.join(CONFORMANCE, "main", "expected_tensors.safetensors"))[case["logits"]][0]
    got = out.recording["logits"][0]
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.05
    assert int(got.argmax()) == int(ref.argmax())


def test_prompt_longer_than_context_is_refused_before_any_work():
    sched = Scheduler(fixture_engine("main"), max_batch=1, context=760)
    image = fixture_image("main", "small_96x64.png")
    req = EngineRequest("long", "query", QueryParams(question="why " * 40), SamplingSettings(temperature=0, max_tokens=5), image)
    with pytest.raises(PromptTooLong, match="context holds 760"):  # the worker answers it 422
        sched.add(req)
    assert not sched.has_work() and sched.stats()["image_encodes"] == 0


def test_new_images_are_encoded_a_few_at_a_time_while_others_decode():
    engine = fixture_engine("main")
    sched = Scheduler(engine, max_batch=8, max_encode_crops=2)  # one 2-crop image per step while running
    running = EngineRequest("r", "caption", CaptionParams(), SamplingSettings(temperature=0, max_tokens=20), fixture_image("main", "small_96x64.png"))
    sched.add(running)
    sched.step()
    names = ["square_378.png", "tall_300x1500.png", "gray_500x400.png"]
    for i, name in enumerate(names[:2]):
        sched.add(EngineRequest(f"n{i}", "caption", CaptionParams(), SamplingSettings(temperature=0, max_tokens=3), fixture_image("main", name)))
    encodes_before = sched.stats()["image_encodes"]
    sched.step()
    assert sched.stats()["image_encodes"] == encodes_before + 1  # the second image waits a step
    sched.step()
    assert sched.stats()["image_encodes"] == encodes_before + 2


def background(rid: str, image_name: str, max_tokens: int = 20) -> EngineRequest:
    return EngineRequest(rid, "caption", CaptionParams(), SamplingSettings(temperature=0, max_tokens=max_tokens),
                         fixture_image("main", image_name), priority=BACKGROUND)


def test_batch_lines_yield_to_interactive_requests():
    engine = fixture_engine("main")
    sched = Scheduler(engine, max_batch=4)  # one slot reserved for interactive requests
    assert sched.reserved_slots == 1
    names = ["square_378.png", "tall_300x1500.png", "gray_500x400.png", "small_96x64.png", "photo_773x767.jpg"]
    for i, name in enumerate(names):
        sched.add(background(f"b{i}", name))
    sched.step()
    # No interactive request runs: batch lines fill all but the reserved slot at once.
    assert {rid for rid in sched.running} == {"b0", "b1", "b2"}
    interactive = EngineRequest("i", "query", QueryParams(question="What is this?"), SamplingSettings(temperature=0, max_tokens=5),
                                fixture_image("main", "landscape_800x600.png"))
    sched.add(interactive)
    assert [req.request_id for req, _ in sched.waiting] == ["i", "b3", "b4"]  # ahead of the batch lines
    events = sched.step()
    assert "i" in sched.running and "b3" not in sched.running  # the reserved slot is the interactive one's
    while "i" in sched.running:
        events += sched.step()
    answer = next(ev.output for ev in events if isinstance(ev, Finished) and ev.request_id == "i")
    alone = run_requests(Scheduler(engine, max_batch=4), [clone(interactive)])
    assert answer == next(iter(alone.values())).output  # batch lines around it change nothing in it


def test_batch_line_encodes_wait_for_steps_where_no_interactive_request_starts():
    engine = fixture_engine("main")
    sched = Scheduler(engine, max_batch=8)
    running = EngineRequest("r", "caption", CaptionParams(), SamplingSettings(temperature=0, max_tokens=30), fixture_image("main", "small_96x64.png"))
    sched.add(running)
    sched.step()
    sched.add(background("b0", "square_378.png"))
    sched.add(background("b1", "tall_300x1500.png"))
    sched.add(EngineRequest("i", "query", QueryParams(question="Where?"), SamplingSettings(temperature=0, max_tokens=5),
                            fixture_image("main", "gray_500x400.png")))
    encodes = sched.stats()["image_encodes"]
    sched.step()  # the interactive request starts alone: no batch line's encode in its step
    assert "i" in sched.running and not {"b0", "b1"} & set(sched.running)
    assert sched.stats()["image_encodes"] == encodes + 1
    sched.step()  # then one batch line's image per step while interactive sequences decode
    assert "b0" in sched.running and "b1" not in sched.running
    sched.step()
    assert "b1" in sched.running


def test_batch_lines_sit_out_steps_while_interactive_ones_decode_and_answer_the_same():
    engine = fixture_engine("main")
    sched = Scheduler(engine, max_batch=8, batch_yield_s=3600.0)  # longer than the test: sit out throughout
    line = background("b", "square_378.png", max_tokens=40)
    sched.add(line)
    sched.step()
    sched.step()
    position = sched.running["b"].ctx.position
    sched.step()
    assert sched.running["b"].ctx.position == position + 1  # alone, it steps every time
    sched.add(EngineRequest("i", "query", QueryParams(question="What is this?"), SamplingSettings(temperature=0, max_tokens=12),
                            fixture_image("main", "square_378.png")))  # same image: no encode in the way
    events = []
    position = sched.running["b"].ctx.position
    while "i" in sched.running or not events:
        events += sched.step()
    assert sched.running["b"].ctx.position == position  # it waited while "i" decoded
    sched.batch_yield_s = 0.0  # and once the wait is over it moves every step again
    while sched.has_work():
        events += sched.step()
    answer = next(ev.output for ev in events if isinstance(ev, Finished) and ev.request_id == "b")
    alone = run_requests(Scheduler(engine, max_batch=8), [background("b2", "square_378.png", max_tokens=40)])
    assert answer == alone["b2"].output


def test_batch_lines_keep_moving_under_steady_interactive_load():
    engine = fixture_engine("main")
    sched = Scheduler(engine, max_batch=8, batch_yield_s=0.0)
    sched.add(background("b", "square_378.png", max_tokens=200))
    sched.step()
    sched.batch_yield_s = 0.05
    for i in range(3):  # interactive requests back to back for a while
        sched.add(EngineRequest(f"i{i}", "query", QueryParams(question="What is this?"), SamplingSettings(temperature=0, max_tokens=30),
                                fixture_image("main", "square_378.png")))
    position, started = sched.running["b"].ctx.position, time.perf_counter()
    while any(rid.startswith("i") for rid in sched.running) or sched.waiting:
        sched.step()
    elapsed = time.perf_counter() - started
    moved = sched.running["b"].ctx.position - position
    assert 1 <= moved <= elapsed / 0.05 + 1  # at most one step per 50 ms, and never none
