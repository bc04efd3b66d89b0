"""Loading: the local-directory path the fixtures use, and one clear line for every failure."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from gpu_worker.engine import ModelLoadError, load_model
from shared.config import Config
from shared.protocol import CaptionParams, SamplingSettings
from tests.engine_helpers import CONFORMANCE

MAIN = os.path.join(CONFORMANCE, "main")


def expect_error(cfg: Config, *fragments: str) -> str:
    with pytest.raises(ModelLoadError) as err:
        load_model(cfg)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def copy_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(MAIN, target, ignore=shutil.ignore_patterns("images", "expected*"))
    return target


def test_local_directory_loads_in_serving_dtype():
    engine = load_model(Config(model=MAIN, device="cpu", dtype="auto"))
    assert engine.info["revision"] == "2025-06-21" and engine.info["test_model"] is True
    assert all(t.dtype == torch.float32 for t in engine.weights.values())  # stored bf16, served float32 on CPU
    bf16 = load_model(Config(model=MAIN, device="cpu", dtype="bfloat16"))
    assert bf16.weights["text.wte"].dtype == torch.bfloat16


def test_hub_unreachable_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    expect_error(Config(model="vikhyatk/moondream2", device="cpu"), "vikhyatk/moondream2@2025-06-21", "hub")


def test_missing_directory_is_named():
    expect_error(Config(model="/no/such/checkpoint", device="cpu"), "/no/such/checkpoint", "not a directory")


def test_unknown_revision(monkeypatch):
    expect_error(Config(model="vikhyatk/moondream2", revision="2024-01-01", device="cpu"), "2024-01-01")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file(tmp_path, missing):
    ckpt = copy_checkpoint(tmp_path)
    os.remove(ckpt / missing)
    expect_error(Config(model=str(ckpt), device="cpu"), missing)


def test_shape_mismatch_names_the_weight(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["text"]["ff_dim"] = 512
    (ckpt / "config.json").write_text(json.dumps(raw))
    expect_error(Config(model=str(ckpt), device="cpu"), "text.blocks.0.mlp.fc1.weight", "(256, 128)")


def test_corrupt_weights_and_bad_settings(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    expect_error(Config(model=str(ckpt), device="cpu"), "safetensors")
    expect_error(Config(model=MAIN, device="cpu", dtype="int7"), "MOONDREAM_DTYPE")
    expect_error(Config(model="random:huge", device="cpu"), "random:full")
    if not torch.cuda.is_available():
        expect_error(Config(model=MAIN, device="cuda"), "CUDA")


def test_random_tiny_model_runs():
    from gpu_worker.engine_types import EngineRequest
    from tests.engine_helpers import fixture_image, run_requests

    engine = load_model(Config(model="random:tiny", device="cpu"))
    sched = engine.create_scheduler(max_batch=2)
    req = EngineRequest("r", "caption", CaptionParams(length="short"), SamplingSettings(temperature=0, max_tokens=4),
                        fixture_image("main", "small_96x64.png"))
    out = run_requests(sched, [req])["r"]
    assert out.error is None and out.metrics["output_tokens"] <= 4
