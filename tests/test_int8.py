"""MOONDREAM_DTYPE=int8: the big linears run as fbgemm int8, the rest stays float32.

Answers are not compared with float32 token for token (bench/int8.py reports the
fidelity); these tests check what must hold: what is converted and what is not,
every skill answers (variants too), and the whole stack serves with it."""
from __future__ import annotations

import base64
import json
import os
import urllib.request
import uuid

import pytest
import torch

from gpu_worker.engine import load_model
from gpu_worker.engine_types import EngineRequest
from gpu_worker.quantize import Int8Linear, quantizable
from shared.config import Config
from tests.engine_helpers import CONFORMANCE, VARIANTS_DIR, fixture_engine, fixture_image, run_requests, variant_store
from tests.stack import running_stack


@pytest.fixture(scope="module")
def int8_engine():
    return load_model(Config(model=os.path.join(CONFORMANCE, "variants"), device="cpu", dtype="int8"))


def test_big_linears_converted_rest_float(int8_engine):
    w = int8_engine.weights
    names = {n for part in quantizable(int8_engine.config).values() for n in part}
    assert all(isinstance(w[n + ".weight"], Int8Linear) for n in names)
    assert not any(n + ".bias" in w for n in names)  # packed with the weight
    floats = [k for k, v in w.items() if isinstance(v, torch.Tensor)]
    assert all(w[k].dtype == torch.float32 for k in floats)
    assert any(k.startswith("region.") for k in floats) and "text.wte" in floats and "vision.patch_emb.weight" in floats
    assert int8_engine.info["dtype"] == "int8"


def test_int8_keeps_keys_and_values_in_bfloat16(int8_engine):
    cache = int8_engine.new_cache(100)
    assert all(t.dtype == torch.bfloat16 for t in cache.k + cache.v)
    [prefix] = int8_engine.encode_images([fixture_image("variants", "photo_773x767.jpg")])
    assert all(t.dtype == torch.bfloat16 for t in prefix.k + prefix.v)
    # the decode step reads that cache and still answers in the model's dtype
    seq = cache.open_sequence(cache.store_prefix(prefix), 800)
    hidden = int8_engine.forward(int8_engine.embed_tokens([5]).view(1, 1, -1), [prefix.length], [seq], cache)
    assert hidden.dtype == torch.float32 and bool(torch.isfinite(hidden).all())


@pytest.mark.parametrize("name", ["text.blocks.0.mlp.fc1", "vision.blocks.3.attn.qkv"])  # packed for fbgemm / oneDNN
def test_int8_linear_close_to_float(int8_engine, name):
    ref = fixture_engine("variants").weights
    x = torch.randn(3, 5, ref[name + ".weight"].shape[1])
    got = int8_engine.weights[name + ".weight"](x)
    want = torch.nn.functional.linear(x, ref[name + ".weight"], ref[name + ".bias"])
    assert got.shape == want.shape
    assert float((got - want).abs().max() / want.abs().max()) < 0.05


def test_every_skill_answers_with_int8_and_variants(int8_engine):
    sched = int8_engine.create_scheduler(max_batch=8, variants=variant_store(int8_engine))
    image = fixture_image("variants", "photo_773x767.jpg")
    greedy = {"temperature": 0, "max_tokens": 8}
    reqs = [EngineRequest(uuid.uuid4().hex, "caption", {"length": "short"}, dict(greedy), image),
            EngineRequest(uuid.uuid4().hex, "query", {"question": "What?", "reasoning": True}, dict(greedy), image),
            EngineRequest(uuid.uuid4().hex, "query", {"question": "Hi"}, {**greedy, "variant": "ft-beta@7"}, None),
            EngineRequest(uuid.uuid4().hex, "detect", {"object": "cat"}, {"max_objects": 2, "variant": "ft-alpha@100"}, image),
            EngineRequest(uuid.uuid4().hex, "point", {"object": "sofa"}, {"max_objects": 2}, image)]
    outcomes = run_requests(sched, reqs)
    for r in reqs:
        out = outcomes[r.request_id]
        assert out.error is None and out.output, (r.skill, out.error)
    assert outcomes[reqs[0].request_id].output["caption"] and outcomes[reqs[3].request_id].output["objects"]


def test_int8_on_a_gpu_is_a_clear_error():
    from gpu_worker.checkpoint import ModelLoadError

    with pytest.raises(ModelLoadError, match="int8 runs on the CPU"):
        load_model(Config(model=os.path.join(CONFORMANCE, "main"), device="cuda", dtype="int8"))


def test_stack_serves_int8():
    with running_stack(MOONDREAM_MODEL=os.path.join(CONFORMANCE, "variants"), MOONDREAM_DTYPE="int8",
                       VARIANT_DIR=VARIANTS_DIR, preprocess_workers=1) as stack:
        code, health = stack.health()
        assert code == 200 and health["model"]["dtype"] == "int8"
        for body in ({"length": "short", "settings": {"max_tokens": 6}},
                     {"length": "short", "settings": {"max_tokens": 6}, "variant": "ft-alpha@100"}):
            with open(os.path.join(CONFORMANCE, "variants", "images", "small_96x64.png"), "rb") as f:
                body["image_url"] = "data:image/png;base64," + base64.b64encode(f.read()).decode()
            req = urllib.request.Request(stack.url + "/v1/caption", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                answer = json.loads(resp.read())
            assert resp.status == 200 and answer["caption"] and answer["metrics"]["output_tokens"] >= 1
