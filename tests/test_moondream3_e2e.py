"""Moondream 3 through the whole stack (supervisord, broker, workers, HTTP).

The stack serves the `md3-main` conformance model.  Images are sent as the fixture's own
bytes, so every answer must be exactly the reference's answer from
tests/conformance/md3-main/expected.json, streamed or not, including the text-only query
that leaves `reasoning` out (Moondream 3 reasons by default)."""
from __future__ import annotations

import json
import os

import moondream as md
import pytest
from moondream.types import Base64EncodedImage

from tests.engine_helpers import CONFORMANCE
from tests.http_helpers import fixture_data_url, http_json
from tests.stack import running_stack
from tests.test_conformance import close_numbers

pytestmark = pytest.mark.timeout(600)

SET_DIR = os.path.join(CONFORMANCE, "md3-main")
CASES = json.load(open(os.path.join(SET_DIR, "expected.json")))["cases"]


@pytest.fixture(scope="module")
def stack():
    with running_stack(MOONDREAM_MODEL=SET_DIR, preprocess_workers=1) as s:
        yield s


def data_url(image_name: str) -> str:
    return fixture_data_url("md3-main", image_name)


def post(stack, route: str, body: dict) -> tuple[int, dict]:
    return http_json(stack, "POST", f"/v1/{route}", body)


def body_for(case) -> dict:
    body = dict(case["args"])  # exactly the reference's arguments: `reasoning` left out where it was
    if case["image"]:
        body["image_url"] = data_url(case["image"])
    return body


def expected(case) -> dict:
    out = dict(case["output"])
    if case["skill"] == "query" and out.get("reasoning") is None:
        out.pop("reasoning", None)
    return out


def test_every_case_over_http_is_the_references_answer(stack):
    for case in CASES:
        status, got = post(stack, case["skill"], body_for(case))
        assert status == 200, (case, got)
        answer = {k: v for k, v in got.items() if k in case["output"]}
        assert close_numbers(answer, expected(case), 1e-6), case
        if case["skill"] == "query" and "reasoning" not in case["args"]:
            assert "reasoning" in got  # left out: Moondream 3 reasons


def test_streamed_answers_through_the_official_client(stack):
    client = md.vl(endpoint=f"{stack.url}/v1", model="moondream3-preview")
    # The client sends `reasoning` only when it is true (as to the cloud, where Moondream 3 then
    # reasons anyway): plain queries are the test above's, sent with "reasoning": false.
    chosen = [c for c in CASES if (c["skill"] == "caption" or (c["skill"] == "query" and c["args"].get("reasoning")))
              and c["image"] in ("small_96x64.png", "photo_773x767.jpg")]
    assert len(chosen) >= 8
    for case in chosen:
        args = dict(case["args"])
        image = Base64EncodedImage(image_url=data_url(case["image"])) if case["image"] else None
        if case["skill"] == "caption":
            out = client.caption(image, length=args["length"], stream=True, settings=args["settings"])
            assert "".join(out["caption"]) == case["output"]["caption"], case
        else:
            out = client.query(image, args["question"], stream=True, settings=args["settings"],
                               reasoning=args["reasoning"], spatial_refs=args.get("spatial_refs"))
            assert "".join(out["answer"]) == case["output"]["answer"], case


def test_moondream3_names_errors_and_health(stack):
    status, health = stack.health()
    assert status == 200 and health["model"]["id"] == "moondream3-preview"
    assert health["model"]["revision"] == "moondream3-preview"
    question = {"question": "Hi", "reasoning": False, "settings": {"temperature": 0, "max_tokens": 3}}
    status, body = post(stack, "query", {**question, "model": "moondream3-preview"})
    assert status == 200 and body["answer"] is not None
    status, body = post(stack, "query", {**question, "model": "moondream2"})
    assert status == 404 and "moondream3-preview" in json.dumps(body)
    status, body = post(stack, "query", {**question, "variant": "ft-alpha@100"})
    assert status == 422 and "variants are not supported" in json.dumps(body)
    status, body = post(stack, "query", {**question, "settings": {"max_tokens": 1020}})  # context: 1024
    assert status == 422 and "context" in json.dumps(body)

