"""Our engine against the numbers the public reference implementation produced on
the conformance models (tests/conformance/*/expected.json), at the README's tolerances:
tiling, crop hashes, prompt ids, every token, text and stream chunks exactly;
detect/point coordinates within 1e-6; tensors within 1e-4 relative (Moondream 2) or
1e-5 relative (Moondream 3, tests/conformance/md3-*: at 1e-4 a tanh tau GELU would pass)."""
from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gpu_worker.scheduler import top_p_filter
from shared.image_tiling import tile_image
from tests.engine_helpers import (CONFORMANCE, KV_LAYOUT_IDS, KV_LAYOUTS, MD3_SETS, SETS, fixture_engine, fixture_image,
                                  fixture_scheduler,
                                  request_from_case, run_requests)


def expected(set_name):
    with open(os.path.join(CONFORMANCE, set_name, "expected.json")) as f:
        return json.load(f)


def tensors(set_name):
    return load_file(os.path.join(CONFORMANCE, set_name, "expected_tensors.safetensors"))


MAIN_SETS = ("main", "md3-main")  # the sets with vision tensors and sampling


def tolerance(set_name):
    return 1e-5 if set_name in MD3_SETS else 1e-4


def rel_err(got, ref):
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def close_numbers(a, b, tol=1e-6):
    """Structural equality with numbers compared within tol."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close_numbers(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close_numbers(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=0, abs_tol=tol)
    return a == b


@pytest.mark.parametrize("set_name", SETS)
def test_tiling_and_crops_bit_exact(set_name):
    for name, exp in expected(set_name)["images"].items():
        with Image.open(os.path.join(CONFORMANCE, set_name, "images", name)) as im:
            assert list(im.size) == exp["size_wh"] and im.mode == exp["mode"]
            tiled = tile_image(im.convert("RGB"))
        assert list(tiled.tiling) == exp["tiling_rows_cols"], name
        assert tiled.crops.shape[0] == exp["n_crops"], name
        assert hashlib.sha256(tiled.crops.tobytes()).hexdigest() == exp["crops_uint8_sha256"], name


@pytest.mark.parametrize("set_name", MAIN_SETS)
def test_debug_crops_match(set_name):
    ref = tensors(set_name)
    for key in [k for k in ref if k.endswith(".crops_uint8")]:
        name = key[: -len(".crops_uint8")]
        crops = fixture_image(set_name, name).crops
        assert torch.equal(torch.from_numpy(crops[: ref[key].shape[0]]), ref[key].to(torch.uint8)), name


@pytest.mark.parametrize("set_name", MAIN_SETS)
def test_vision_output_and_image_embedding(set_name):
    engine = fixture_engine(set_name)
    ref = tensors(set_name)
    names = [k[: -len(".image_embedding")] for k in ref if k.endswith(".image_embedding")]
    assert names
    from gpu_worker import model as M

    for name in names:
        image = fixture_image(set_name, name)
        crops = M.crops_to_input(torch.from_numpy(image.crops), torch.float32)
        vision_global = M.vision_encoder(crops[:1], engine.weights, engine.config)[0]
        assert rel_err(vision_global, ref[f"{name}.vision_encoder_out_global"]) <= tolerance(set_name), name
        embedding = engine.image_embeddings([image])[0]
        assert rel_err(embedding, ref[f"{name}.image_embedding"]) <= tolerance(set_name), name


# Every case under the default KV block size with the CPU's attention; under the GPU's
# attention (gather, another block size) each model family's main set (the other sets differ in
# what the programs do, not in how attention reads the pool; adapters under both layouts:
# tests/test_variants.py).
GATHER_SETS = ("main", "md3-main")


def layout_cases():
    for (block_size, attention), layout_id in zip(KV_LAYOUTS[:2], KV_LAYOUT_IDS[:2]):
        for set_name in SETS:
            if layout_id != KV_LAYOUT_IDS[0] and set_name not in GATHER_SETS:
                continue
            for index, case in enumerate(expected(set_name)["cases"]):
                yield pytest.param((block_size, attention), set_name, index, case,
                                   id=f"{layout_id}-{set_name}-{index}-{case['skill']}")


@pytest.fixture(scope="module")
def schedulers():
    # one scheduler per layout and set for all its cases: a cache that mixed up variants would fail the next case
    made = {}

    def scheduler(layout, set_name):
        if (layout, set_name) not in made:
            block_size, attention = layout
            made[layout, set_name] = fixture_scheduler(set_name, max_batch=2, block_size=block_size, attention=attention)
        return made[layout, set_name]
    return scheduler


@pytest.mark.parametrize("layout,set_name,index,case", list(layout_cases()))
def test_case(schedulers, layout, set_name, index, case):
    image = fixture_image(set_name, case["image"]) if case["image"] else None
    request = request_from_case(case, image)
    sched = schedulers(layout, set_name)
    out = run_requests(sched, [request], record=True)[request.request_id]
    assert out.error is None, out.error
    if sched.engine.compiled is not None:  # COMPILE=on (tests/engine_helpers.py): the graph served, never fell back
        assert not sched.engine.compiled.broken
    rec = out.recording
    assert rec["feeds"][0] == case["prompt_tokens"] or (
        rec["feeds"][0] is None and case["args"].get("spatial_refs")), "prompt ids"
    if case["skill"] in ("detect", "point"):
        assert close_numbers(out.output, case["output"], 1e-6)
        return
    assert out.output == case["output"]
    assert out.chunks == case["stream_chunks"]
    assert "".join(out.chunks) == (out.output.get("caption") or out.output.get("answer") or "")
    fed = [t for feed in rec["feeds"][1:] if feed is not None for t in feed]
    # an answer that ends at max_tokens skips the reference's last (output-free) feed
    expected_fed = case["generated_tokens"][:-1] if out.finish_reason == "length" else case["generated_tokens"]
    assert fed == expected_fed
    ref = tensors(set_name)[case["logits"]]
    got = torch.stack(rec["logits"][: ref.shape[0]])
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= tolerance(set_name)


@pytest.mark.parametrize("set_name", MAIN_SETS)
def test_spatial_ref_prompt_ids(set_name):
    """Spatial-ref prompts are fed as embeddings; check their ids separately."""
    from gpu_worker.programs import ProgramContext, query_prompt

    ctx = ProgramContext(engine=fixture_engine(set_name), emit=lambda _: None)
    cases = [c for c in expected(set_name)["cases"] if c["args"].get("spatial_refs")]
    assert cases
    for case in cases:
        if case["args"].get("spatial_refs"):
            ids = query_prompt(ctx, case["args"]["question"], case["args"].get("reasoning", False),
                               case["args"]["spatial_refs"])
            assert ids == case["prompt_tokens"]


@pytest.mark.parametrize("set_name", MAIN_SETS)
def test_top_p_filter_matches_reference(set_name):
    exp = expected(set_name)
    ref = tensors(set_name)
    for entry in exp["sampling"]:
        name, row = entry["logits"].rsplit("[", 1)
        logits = ref[name][int(row.rstrip("]"))]
        probs = top_p_filter(torch.softmax(logits / entry["temperature"], dim=-1), entry["top_p"])
        assert rel_err(probs, ref[entry["probs"]]) <= tolerance(set_name)
