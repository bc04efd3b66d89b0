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
from shared.protocol import CaptionParams, DetectParams, PointParams, QueryParams, SamplingSettings
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


def _skill_requests(image):
    greedy = SamplingSettings(temperature=0, max_tokens=8)
    return [EngineRequest(uuid.uuid4().hex, "caption", CaptionParams(length="short"), greedy, image),
            EngineRequest(uuid.uuid4().hex, "query", QueryParams(question="What?", reasoning=True), greedy, image),
            EngineRequest(uuid.uuid4().hex, "query", QueryParams(question="Hi"), greedy, None, variant="ft-beta@7"),
            EngineRequest(uuid.uuid4().hex, "detect", DetectParams(object="cat"), SamplingSettings(max_objects=2), image, variant="ft-alpha@100"),
            EngineRequest(uuid.uuid4().hex, "point", PointParams(object="sofa"), SamplingSettings(max_objects=2), image)]


def test_every_skill_answers_with_int8_and_variants_batched_as_alone(int8_engine):
    """Every skill answers in int8, variants too, and a batch of them answers exactly as each
    request alone (int8 rows must not leak into each other through the shared quantized linears);
    the variants change the answer they are applied to."""
    image = fixture_image("variants", "photo_773x767.jpg")
    batched_reqs = _skill_requests(image)
    batched = run_requests(int8_engine.create_scheduler(max_batch=8, variants=variant_store(int8_engine)), batched_reqs)
    for req in _skill_requests(image):
        alone = run_requests(int8_engine.create_scheduler(max_batch=8, variants=variant_store(int8_engine)), [req])
        [twin] = [r for r in batched_reqs if (r.skill, r.params, r.settings) == (req.skill, req.params, req.settings)]
        got, want = batched[twin.request_id], alone[req.request_id]
        assert got.error is None and want.error is None, (req.skill, got.error, want.error)
        assert got.output == want.output and got.chunks == want.chunks, req.skill
    assert batched[batched_reqs[0].request_id].output["caption"]
    assert len(batched[batched_reqs[3].request_id].output["objects"]) >= 1
    # the same detect without the variant answers differently: the adapter ran in int8 mode
    base = batched_reqs[3]
    plain = EngineRequest(uuid.uuid4().hex, "detect", base.params, SamplingSettings(max_objects=2), image)
    without = run_requests(int8_engine.create_scheduler(max_batch=8, variants=variant_store(int8_engine)), [plain])
    assert without[plain.request_id].output != batched[base.request_id].output


def test_int8_on_a_gpu_is_a_clear_error():
    from gpu_worker.checkpoint import ModelLoadError

    with pytest.raises(ModelLoadError, match="int8 runs on the CPU"):
        load_model(Config(model=os.path.join(CONFORMANCE, "main"), device="cuda", dtype="int8"))


def test_stack_serves_int8():
    """The stack serves int8, base model and variants (which answer differently)."""
    image_path = os.path.join(CONFORMANCE, "variants", "images", "small_96x64.png")
    with running_stack(MOONDREAM_MODEL=os.path.join(CONFORMANCE, "variants"), MOONDREAM_DTYPE="int8",
                       VARIANT_DIR=VARIANTS_DIR, preprocess_workers=1) as stack:
        code, health = stack.health()
        assert code == 200 and health["model"]["dtype"] == "int8"
        served = []
        for body in ({"length": "short", "settings": {"max_tokens": 6}},
                     {"length": "short", "settings": {"max_tokens": 6}, "variant": "ft-alpha@100"}):
            with open(image_path, "rb") as f:
                body["image_url"] = "data:image/png;base64," + base64.b64encode(f.read()).decode()
            req = urllib.request.Request(stack.url + "/v1/caption", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                answer = json.loads(resp.read())
            assert resp.status == 200
            served.append(answer["caption"])
    # int8 answers are not compared across processes: fbgemm's rounding follows the thread split
    # (the in-process test above checks batched == alone); the variant must change the answer
    assert all(served) and served[0] != served[1]


@pytest.fixture(scope="module")
def md3_int8_engine():
    return load_model(Config(model=os.path.join(CONFORMANCE, "md3-main"), device="cpu", dtype="int8"))


def test_moondream3_experts_are_int8_and_close_to_float(md3_int8_engine):
    from gpu_worker import moondream3 as MD3
    from gpu_worker.quantize import Int8Experts

    w, cfg = md3_int8_engine.weights, md3_int8_engine.config
    parts = quantizable(cfg)
    assert parts["experts"] and all(isinstance(w[n + ".weight"], Int8Experts) for n in parts["experts"])
    assert all(isinstance(w[n + ".weight"], Int8Linear) for n in parts["text"] + parts["vision"])
    assert all(isinstance(w[f"text.blocks.{i}.attn.tau.wq"], torch.Tensor) for i in range(cfg.n_layers))
    ref = fixture_engine("md3-main").weights
    h = torch.randn(2, 6, cfg.dim, generator=torch.Generator().manual_seed(5))
    got = MD3.moe_mlp(h, w, "text.blocks.3.mlp", cfg)
    want = MD3.moe_mlp(h, ref, "text.blocks.3.mlp", cfg)
    assert float((got - want).abs().max() / want.abs().max()) < 0.05


def test_every_moondream3_skill_answers_with_int8(md3_int8_engine):
    sched = md3_int8_engine.create_scheduler(max_batch=8)
    image = fixture_image("md3-main", "photo_773x767.jpg")
    greedy = SamplingSettings(temperature=0, max_tokens=8)
    reqs = [EngineRequest(uuid.uuid4().hex, "caption", CaptionParams(length="short"), greedy, image),
            EngineRequest(uuid.uuid4().hex, "query", QueryParams(question="What?"), greedy, image),  # reasons by default
            EngineRequest(uuid.uuid4().hex, "query", QueryParams(question="Hi", reasoning=False), greedy, None),
            EngineRequest(uuid.uuid4().hex, "detect", DetectParams(object="cat"), SamplingSettings(max_objects=2), image),
            EngineRequest(uuid.uuid4().hex, "point", PointParams(object="sofa"), SamplingSettings(max_objects=2), image)]
    outcomes = run_requests(sched, reqs)
    for r in reqs:
        out = outcomes[r.request_id]
        assert out.error is None and out.output, (r.skill, out.error)
    assert "reasoning" in outcomes[reqs[1].request_id].output
