"""Two models served side by side (MOONDREAM_MODELS): one GPU worker each under supervisord,
the broker routing every request by its `model`.

The stack serves the Moondream 2 `main` set and the Moondream 3 `md3-main` set; each model's
cases, sent with its id, must be exactly that set's reference answers (streamed too)."""
from __future__ import annotations

import json
import os

import moondream as md
import pytest
from moondream.types import Base64EncodedImage

from tests.engine_helpers import CONFORMANCE
from tests.http_helpers import fixture_data_url, http_json
from tests.stack import running_stack, wait_for
from tests.test_conformance import close_numbers

pytestmark = pytest.mark.timeout(600)

SETS = {"moondream2": "main", "moondream3-preview": "md3-main"}
PHOTO = "photo_773x767.jpg"


def cases(set_name: str) -> list:
    with open(os.path.join(CONFORMANCE, set_name, "expected.json")) as f:
        # the photo's cases and the text-only ones: every skill, reasoning and spatial refs included
        return [c for c in json.load(f)["cases"] if c["image"] in (None, PHOTO)]


@pytest.fixture(scope="module")
def stack():
    models = ",".join(f"{model_id}={os.path.join(CONFORMANCE, s)}" for model_id, s in SETS.items())
    with running_stack(MOONDREAM_MODELS=models, preprocess_workers=1, TORCH_THREADS=1) as s:
        wait_for(lambda: all(m["ready"] for m in s.health()[1]["models"]), 240, "both GPU workers registered", s)
        yield s


def expected(case) -> dict:
    out = dict(case["output"])
    if case["skill"] == "query" and out.get("reasoning") is None:
        out.pop("reasoning", None)
    return out


@pytest.mark.parametrize("model_id", list(SETS))
def test_each_model_answers_its_own_cases(stack, model_id):
    set_name = SETS[model_id]
    for case in cases(set_name):
        body = {**case["args"], "model": model_id}
        if case["image"]:
            body["image_url"] = fixture_data_url(set_name, case["image"])
        status, got = http_json(stack, "POST", f"/v1/{case['skill']}", body)
        assert status == 200, (model_id, case, got)
        answer = {k: v for k, v in got.items() if k in case["output"]}
        assert close_numbers(answer, expected(case), 1e-6), (model_id, case)


@pytest.mark.parametrize("model_id", list(SETS))
def test_each_model_streams_its_answers(stack, model_id):
    set_name = SETS[model_id]
    client = md.vl(endpoint=f"{stack.url}/v1", model=model_id)
    # the official client sends `reasoning` only when true: plain queries would reason on Moondream 3
    chosen = [c for c in cases(set_name) if c["skill"] == "caption"
              or (c["skill"] == "query" and c["args"].get("reasoning"))]
    assert len(chosen) >= 4
    for case in chosen:
        args = dict(case["args"])
        image = Base64EncodedImage(image_url=fixture_data_url(set_name, case["image"])) if case["image"] else None
        if case["skill"] == "caption":
            out = client.caption(image, length=args["length"], stream=True, settings=args["settings"])
            assert "".join(out["caption"]) == case["output"]["caption"], (model_id, case)
        else:
            out = client.query(image, args["question"], stream=True, settings=args["settings"], reasoning=True,
                               spatial_refs=args.get("spatial_refs"))
            assert "".join(out["answer"]) == case["output"]["answer"], (model_id, case)


def test_models_health_names_and_unknown_models(stack):
    status, health = stack.health()
    assert status == 200 and [m["id"] for m in health["models"]] == list(SETS)
    assert [m["family"] for m in health["models"]] == ["moondream2", "moondream3"]
    assert all(m["ready"] for m in health["models"]) and health["model"]["id"] == "moondream2"
    status, listing = http_json(stack, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in listing["data"]][:2] == list(SETS)
    question = {"question": "Hi", "reasoning": False, "settings": {"temperature": 0, "max_tokens": 24}}
    md2_case = next(c for c in cases("main") if c["image"] is None and c["skill"] == "query")
    md2_body = {**md2_case["args"]}
    for name in (None, "moondream2", "vikhyatk/moondream2"):  # the default is the first model
        status, got = http_json(stack, "POST", "/v1/query", {**md2_body, **({"model": name} if name else {})})
        assert status == 200 and got["answer"] == md2_case["output"]["answer"], name
    status, got = http_json(stack, "POST", "/v1/query", {**question, "model": "moondream/moondream3-preview"})
    assert status == 200
    status, got = http_json(stack, "POST", "/v1/query", {**question, "model": "moondream9"})
    assert status == 404 and "moondream2" in json.dumps(got) and "moondream3-preview" in json.dumps(got)
    status, got = http_json(stack, "POST", "/v1/chat/completions",
                       {"model": "moondream3-preview", "messages": [{"role": "user", "content": "Hi"}],
                        "max_tokens": 3, "temperature": 0})
    assert status == 200 and got["model"] == "moondream3-preview"
    status, got = http_json(stack, "POST", "/v1/query", {**question, "model": "moondream3-preview/ft-alpha@100"})
    assert status == 422 and "variants are not supported" in json.dumps(got)


def test_batch_cli_model_sends_every_line_to_that_model(stack, tmp_path):
    import subprocess
    import sys

    chosen = [c for c in cases("md3-main") if c["skill"] in ("caption", "detect", "point")][:4]
    source = tmp_path / "in.jsonl"
    with open(source, "w") as f:
        for i, case in enumerate(chosen):
            f.write(json.dumps({"id": f"l{i}", "skill": case["skill"], **case["args"],
                                "image": fixture_data_url("md3-main", case["image"])}) + "\n")
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "MOONDREAM_ENDPOINT": stack.url}
    run = subprocess.run([sys.executable, "-m", "batch_cli", "submit", str(source), "--model", "moondream3-preview",
                          "--wait", "--interval", "0.3", "-o", str(out)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"] * len(chosen)
    for row, case in zip(rows, chosen):
        answer = {k: v for k, v in row["result"].items() if k in case["output"]}  # besides finish_reason
        assert close_numbers(answer, expected(case), 1e-6), case
