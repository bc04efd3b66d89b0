"""Running the engine in-process on fixture images, shared by the engine tests,
the end-to-end tests (as the expected answers) and the benchmarks."""
from __future__ import annotations

import dataclasses
import functools
import os
import uuid
from pathlib import Path

import msgspec
from PIL import Image

from gpu_worker.engine import load_model
from gpu_worker.engine_types import EngineRequest, Failed, Finished, ImageInput, TextChunk
from gpu_worker.scheduler import Recorder, Scheduler
from gpu_worker.variants import VariantStore
from shared.config import Config
from shared.image_tiling import pixels_key, tile_image
from shared.protocol import PARAMS_OF_SKILL, SamplingSettings, SkillParams

CONFORMANCE = os.path.join(os.path.dirname(__file__), "conformance")
SETS = ("main", "edge", "edge-reasoning", "edge-grounding", "rev-2025-04-14", "variants", "md3-main", "md3-edge")
MD3_SETS = ("md3-main", "md3-edge")
VARIANTS_DIR = os.path.join(CONFORMANCE, "variants", "variants")  # ft-alpha@100 (rank 4), ft-beta@7 (rank 8)
# KV pool layouts the exactness tests run under: (block size, attention).  16 is the default
# block size and "split" the CPU's attention; "gather" is what a GPU runs; 64 and 5 put the
# 730-position image prefix's end at other places inside a block.
KV_LAYOUTS = [(16, "split"), (64, "gather"), (5, "split")]
KV_LAYOUT_IDS = [f"blocks{b}-{a}" for b, a in KV_LAYOUTS]


@functools.lru_cache(maxsize=None)
def fixture_engine(set_name: str = "main"):
    # COMPILE=on in the environment: the exactness tests with the compiled decode step (minutes of compiling)
    cfg = Config(model=os.path.join(CONFORMANCE, set_name), device="cpu", dtype="float32",
                 compile=os.environ.get("COMPILE", "auto"))
    return load_model(cfg)


def variant_store(engine, directory: str = VARIANTS_DIR, **kwargs) -> VariantStore:
    return VariantStore(engine.config, engine.device, engine.dtype, [Path(directory)], **kwargs)


def fixture_scheduler(set_name: str = "variants", **kwargs) -> Scheduler:
    """A scheduler on a fixture model that also serves the fixture variants."""
    engine = fixture_engine(set_name)
    return Scheduler(engine, variants=variant_store(engine), **kwargs)


def image_input(image: Image.Image) -> ImageInput:
    rgb = image.convert("RGB")
    tiled = tile_image(rgb)
    return ImageInput(crops=tiled.crops, tiling=tiled.tiling, key=pixels_key(rgb))


@functools.lru_cache(maxsize=None)
def fixture_image(set_name: str, name: str) -> ImageInput:
    with Image.open(os.path.join(CONFORMANCE, set_name, "images", name)) as im:
        return image_input(im)


@dataclasses.dataclass
class Outcome:
    output: dict | None
    finish_reason: str | None
    chunks: list
    metrics: dict
    error: str | None = None
    recording: dict | None = None


def run_requests(scheduler: Scheduler, requests: list[EngineRequest], record: bool = False) -> dict[str, Outcome]:
    """Add all requests, step until all are done, collect each one's outcome."""
    outcomes = {r.request_id: Outcome(None, None, [], {}) for r in requests}
    if record:
        scheduler.recorder = Recorder(r.request_id for r in requests)
    for r in requests:
        scheduler.add(r)
    pending = set(outcomes)
    while pending:
        for ev in scheduler.step():
            out = outcomes[ev.request_id]
            if isinstance(ev, TextChunk):
                out.chunks.append(ev.text)
            elif isinstance(ev, Finished):
                out.output, out.finish_reason, out.metrics = ev.output, ev.finish_reason, ev.metrics
                pending.discard(ev.request_id)
            elif isinstance(ev, Failed):
                out.error = ev.message
                pending.discard(ev.request_id)
    if record:
        for rid, out in outcomes.items():
            out.recording = scheduler.recorder.records.get(rid)
        scheduler.recorder = None
    return outcomes


def assert_pool_holds_only_cached_images(scheduler: Scheduler) -> None:
    """Every sequence gave its KV blocks back: the pool holds the image cache's prefixes, nothing else."""
    pool = scheduler.cache
    cached = sum(len(p.blocks) for p in scheduler.images.entries.values())
    assert pool.allocator.reserved == 0
    assert pool.n_blocks - pool.allocator.n_free == cached
    assert pool.prefixes == set(scheduler.images.entries.values())


def skill_params(skill: str, fields: dict) -> SkillParams:
    """A skill's parameters written as a dict (a fixture's, a test table's) -> its typed struct."""
    return msgspec.convert(fields, PARAMS_OF_SKILL[skill])


def sampling(fields: dict) -> SamplingSettings:
    return msgspec.convert(fields, SamplingSettings)


def request_from_case(case: dict, image: ImageInput | None, seed: int | None = None) -> EngineRequest:
    args = dict(case["args"])
    settings = dict(args.pop("settings", {}))
    variant = settings.pop("variant", None)  # the reference takes it in settings; here it is a request field
    return EngineRequest(request_id=uuid.uuid4().hex, skill=case["skill"], params=skill_params(case["skill"], args),
                         settings=sampling(settings), image=image, seed=seed, variant=variant)
