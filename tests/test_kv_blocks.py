"""The paged KV cache: blocks taken as sequences grow and given back when they end, image
prefixes stored once and referenced, admission by free blocks, and none of it changing
an answer (the conformance and batched == serial tests run under several block sizes too)."""
from __future__ import annotations

import dataclasses
import os
import uuid

import numpy as np
import pytest

from gpu_worker.checkpoint import load_checkpoint
from gpu_worker.engine import Engine
from gpu_worker.engine_types import EngineRequest, ImageInput
from gpu_worker.model import BlockAllocator, PoolExhausted, kv_bytes_per_position
from gpu_worker.scheduler import Scheduler
from shared.protocol import QueryParams, SamplingSettings
from tests.engine_helpers import (CONFORMANCE, assert_pool_holds_only_cached_images, fixture_engine, fixture_image,
                                  run_requests)

PREFIX = 730


def summary(outcome):
    return outcome.output, outcome.finish_reason, outcome.chunks, outcome.error


def query(question: str, image, max_tokens: int = 12) -> EngineRequest:
    return EngineRequest(uuid.uuid4().hex, "query", QueryParams(question=question), SamplingSettings(temperature=0, max_tokens=max_tokens),
                         image, seed=3)


def clone(req: EngineRequest) -> EngineRequest:
    return EngineRequest(uuid.uuid4().hex, req.skill, req.params, req.settings, req.image, req.seed)


def serial(engine, requests, **kwargs) -> list:
    return [summary(run_requests(Scheduler(engine, max_batch=1, **kwargs), [clone(r)]).popitem()[1]) for r in requests]


def pool_bytes(engine, positions: int) -> int:
    return kv_bytes_per_position(engine.config, engine.kv_dtype) * positions


def random_image(seed: int) -> ImageInput:
    crops = np.random.default_rng(seed).integers(0, 256, size=(2, 378, 378, 3), dtype=np.uint8)
    return ImageInput(crops=crops, tiling=(1, 1), key=f"random-{seed}")


def test_allocator_takes_low_blocks_for_sequences_and_a_high_run_for_images():
    blocks = BlockAllocator(10)
    assert blocks.take(3) == [0, 1, 2]
    assert blocks.take_run(4) == [6, 7, 8, 9]
    blocks.give_back([1])
    assert blocks.take(2) == [1, 3]
    assert blocks.n_free == 2 and blocks.take_run(2) == [4, 5]  # the last free run
    blocks.give_back([0, 2, 5])
    assert blocks.take_run(3) == [0, 2, 5]  # no run of 3 free: scattered blocks
    with pytest.raises(PoolExhausted):
        blocks.take(1)
    with pytest.raises(RuntimeError, match="freed twice"):
        blocks.give_back([7, 7])


def test_sequences_take_blocks_as_they_grow_and_reference_one_prefix():
    engine = fixture_engine("main")
    image = fixture_image("main", "photo_773x767.jpg")
    sched = Scheduler(engine, max_batch=8, block_size=16)
    reqs = [query(q, image, max_tokens=20) for q in ("What is it?", "Which colour?", "How many?")]
    for r in reqs:
        sched.add(r)
    sched.step()  # admitted, prefilled
    pool = sched.cache
    prefix_blocks = -(-PREFIX // 16)
    assert sched.stats()["image_encodes"] == 1 and len(pool.prefixes) == 1
    prefix = next(iter(pool.prefixes))
    assert prefix.holders == 4 and prefix.run is not None  # 3 sequences + the image cache; one slice of the pool
    for seq in sched.running.values():
        assert seq.kv.prefix is prefix
        # own blocks cover only the positions fed so far, not the reservation
        assert len(seq.kv.blocks) == -(-(seq.ctx.position - PREFIX) // 16)
        assert len(seq.kv.blocks) + seq.kv.reserved == -(-(seq.request.kv_positions - PREFIX) // 16)
    used = prefix_blocks + sum(len(s.kv.blocks) for s in sched.running.values())
    assert pool.used_bytes() == used * pool.block_bytes
    assert pool.shared_bytes() == prefix_blocks * pool.block_bytes
    while sched.has_work():
        sched.step()
    assert_pool_holds_only_cached_images(sched)


def test_a_sequence_on_consecutive_blocks_is_read_as_one_pool_slice():
    """A sequence whose own blocks are consecutive (one alone: the usual batch 1) is read as a
    slice of the pool, no gather; once another sequence's block lands between its own, it is not."""
    import torch

    from gpu_worker.model import batch_layout

    pool = fixture_engine("main").new_cache(n_blocks=24, block_size=4)
    first = pool.open_sequence(None, 20)
    pool.grow(first, 10)  # blocks 0, 1, 2
    assert first.run == 0 and first.own_run(10) == slice(0, 10)
    layout = batch_layout(pool, [first], [9], 1, split_prefixes=True)
    assert layout.read_run == slice(0, 10)
    assert torch.equal(torch.arange(pool.discard_position + 1)[layout.read_run], layout.read[0])
    second = pool.open_sequence(None, 20)
    pool.grow(second, 4)  # block 3
    pool.grow(first, 14)  # block 4: not next to block 2
    assert first.blocks == [0, 1, 2, 4] and first.run is None and first.own_run(14) is None
    assert batch_layout(pool, [first], [13], 1, split_prefixes=True).read_run is None
    assert second.run == 12
    assert batch_layout(pool, [first, second], [13, 3], 1, split_prefixes=True).read_run is None  # batch 2: gathered
    pool.close_sequence(first)
    assert first.run is None


@pytest.mark.parametrize("block_size", [16, 7])
def test_prefix_in_scattered_blocks_answers_the_same(block_size):
    """When no run of free blocks is left, the image's prefix goes to scattered blocks and is
    gathered: the same answers (and a prefix end in mid-block changes nothing either)."""
    engine = fixture_engine("main")
    image = fixture_image("main", "landscape_800x600.png")
    reqs = [query("What is it?", image), query("Where is it?", image, max_tokens=9)]
    sched = Scheduler(engine, max_batch=4, block_size=block_size)
    allocator = sched.cache.allocator
    taken = allocator.take(allocator.n_free)  # fragment the pool: every other block free
    allocator.give_back(taken[::2])
    outcomes = run_requests(sched, reqs)
    assert next(iter(sched.cache.prefixes)).run is None
    assert [summary(outcomes[r.request_id]) for r in reqs] == serial(engine, reqs)


def test_requests_wait_for_blocks_and_all_are_answered_as_alone():
    """A pool for about two requests, six requests on six images: admission waits for blocks
    (nothing fails, nothing is lost), unused images are evicted to make room, answers unchanged."""
    engine = fixture_engine("main")
    names = ["small_96x64.png", "square_378.png", "tall_300x1500.png", "gray_500x400.png", "photo_773x767.jpg",
             "landscape_800x600.png"]
    reqs = [query(f"What is in picture {i}?", fixture_image("main", n), max_tokens=10 + i) for i, n in enumerate(names)]
    sched = Scheduler(engine, max_batch=6, kv_cache_bytes=pool_bytes(engine, 2 * 800))
    for r in reqs:
        sched.add(r)
    outcomes, waited, most = {}, 0, 0
    while sched.has_work():
        for ev in sched.step():
            outcomes[ev.request_id] = ev
        waited = max(waited, sched.stats()["waiting_for_blocks"])
        most = max(most, len(sched.running))
        assert sched.cache.used_bytes() <= sched.cache.bytes()
    assert waited >= 1 and most <= 2
    assert all(hasattr(outcomes[r.request_id], "output") for r in reqs)
    got = [(outcomes[r.request_id].output, outcomes[r.request_id].finish_reason) for r in reqs]
    assert got == [s[:2] for s in serial(engine, reqs)]
    assert_pool_holds_only_cached_images(sched)


def test_a_request_that_can_never_fit_is_refused_before_any_work():
    engine = fixture_engine("main")
    sched = Scheduler(engine, max_batch=4, kv_cache_bytes=pool_bytes(engine, 1000))
    image = fixture_image("main", "small_96x64.png")
    with pytest.raises(ValueError, match="KV_CACHE_GB"):  # the worker answers a ValueError with 422
        sched.add(query("What is it?", image, max_tokens=500))
    assert not sched.has_work() and sched.stats()["image_encodes"] == 0
    fits = query("What is it?", image, max_tokens=100)  # today's limits are unchanged
    assert run_requests(sched, [fits])[fits.request_id].error is None


def test_sequences_never_outgrow_what_admission_reserved():
    """Every skill stays within its reservation (prefix + prompt + max_tokens / objects):
    a sequence that took more would eat blocks promised to others."""
    from tests.test_engine_batching import mixed_requests

    sched = Scheduler(fixture_engine("main"), max_batch=16)
    for r in mixed_requests():
        sched.add(r)
    while sched.has_work():
        sched.step()
        for seq in sched.running.values():
            promised = sched.cache.blocks_for(seq.request.kv_positions - seq.kv.start)
            assert len(seq.kv.blocks) + seq.kv.reserved == promised
            assert seq.ctx.position <= seq.request.kv_positions
    assert sched.cache.allocator.reserved == 0


def long_context_engine(context: int) -> Engine:
    """The tiny model with a longer context (its rotary table follows the config)."""
    checkpoint = load_checkpoint(os.path.join(CONFORMANCE, "main"), "2025-06-21", "cpu", "float32")
    checkpoint.config = dataclasses.replace(checkpoint.config, max_context=context)
    return Engine(checkpoint)


def test_long_context_16_sequences_in_a_pool_for_16_x_1024_positions():
    """A config of 8,192 positions: the slot design would hold 16 x 8,192 positions for 16
    sequences; the pool holds 16 x 1,024 and still runs all 16 at once (each ~900 positions)."""
    engine = long_context_engine(8192)
    reqs = [query("Describe " + "the picture and " * 20 + f"item {i}.", random_image(i), max_tokens=16)
            for i in range(16)]
    sched = Scheduler(engine, max_batch=16, kv_cache_bytes=pool_bytes(engine, 16 * 1024))
    assert sched.cache.context == 8192 and sched.cache.n_blocks * sched.cache.block_size == 16 * 1024
    for r in reqs:
        sched.add(r)
        assert 850 <= r.kv_positions <= 1000  # ~900 positions each
    outcomes, most = {}, 0
    while sched.has_work():
        for ev in sched.step():
            outcomes[ev.request_id] = ev
        most = max(most, len(sched.running))
    assert most == 16
    assert [(outcomes[r.request_id].output, outcomes[r.request_id].finish_reason) for r in reqs] == \
        [s[:2] for s in serial(engine, reqs, kv_cache_bytes=pool_bytes(engine, 16 * 1024))]
