"""Fine-tuned variants through the whole stack (supervisord, broker, workers, HTTP).

The stack serves the `variants` conformance model with its two adapters in
VARIANT_DIR.  Images are sent as the fixture's own PNG bytes (the official client
passes an already-encoded image through unchanged), so every answer must be
exactly the reference's answer from tests/conformance/variants/expected.json."""
from __future__ import annotations

import json
import os
import urllib.request

import moondream as md
import pytest
from moondream.types import Base64EncodedImage

from tests.engine_helpers import CONFORMANCE, VARIANTS_DIR
from tests.http_helpers import fixture_data_url, http_json
from tests.stack import running_stack
from tests.test_conformance import close_numbers

pytestmark = pytest.mark.timeout(300)

SET_DIR = os.path.join(CONFORMANCE, "variants")
CASES = json.load(open(os.path.join(SET_DIR, "expected.json")))["cases"]


@pytest.fixture(scope="module")
def stack():
    with running_stack(MOONDREAM_MODEL=SET_DIR, VARIANT_DIR=VARIANTS_DIR, preprocess_workers=1) as s:
        yield s


def data_url(image_name: str) -> str:
    return fixture_data_url("variants", image_name)


def post(stack, route: str, body: dict) -> tuple[int, dict]:
    return http_json(stack, "POST", f"/v1/{route}", body)


def cases_for(variant, image=None):
    return [c for c in CASES if c["args"].get("settings", {}).get("variant") == variant
            and (image is None or c["image"] == image)]


def call_python_client(client, case, stream=False):
    args = dict(case["args"])
    settings = {k: v for k, v in args.pop("settings").items() if k != "variant"}
    image = Base64EncodedImage(image_url=data_url(case["image"])) if case["image"] else None
    if case["skill"] == "caption":
        out = client.caption(image, length=args["length"], stream=stream, settings=settings)
        return {"caption": "".join(out["caption"]) if stream else out["caption"]}
    if case["skill"] == "query":
        out = client.query(image, args["question"], stream=stream, settings=settings,
                           reasoning=args.get("reasoning", False), spatial_refs=args.get("spatial_refs"))
        return {**out, "answer": "".join(out["answer"])} if stream else out
    if case["skill"] == "detect":
        return client.detect(image, args["object"], settings=settings)
    return client.point(image, args["object"], settings=settings)


def expected(case, streamed=False):
    out = dict(case["output"])
    if case["skill"] == "query" and out.get("reasoning") is None:
        out.pop("reasoning", None)
    if streamed:  # a stream carries only the text
        key = "caption" if case["skill"] == "caption" else "answer"
        return {key: out[key]}
    return out


def test_python_client_with_a_variant_model_gets_the_fixture_answers(stack):
    client = md.vl(endpoint=f"{stack.url}/v1", model="moondream2/ft-alpha@100")
    cases = cases_for("ft-alpha@100")
    assert {c["skill"] for c in cases} == {"caption", "query", "detect"} and any(c["image"] is None for c in cases)
    for case in cases:
        assert close_numbers(call_python_client(client, case), expected(case)), case
        if case["skill"] in ("caption", "query"):
            got = call_python_client(client, case, stream=True)
            key = "caption" if case["skill"] == "caption" else "answer"
            assert got[key] == expected(case)[key], case


def body_for(case) -> dict:
    args = dict(case["args"])
    settings = {k: v for k, v in args.pop("settings").items() if k != "variant"}
    body = {**args, "settings": settings}
    if case["image"]:
        body["image_url"] = data_url(case["image"])
    return body


def test_top_level_variant_and_settings_variant(stack):
    """The Node client's top-level `variant`, and the reference's `settings.variant`."""
    for case in cases_for("ft-beta@7", "landscape_800x600.png") + cases_for(None, "landscape_800x600.png"):
        variant = case["args"]["settings"].get("variant")
        top = {**body_for(case), **({"variant": variant} if variant else {})}
        code, got = post(stack, case["skill"], top)
        assert code == 200, got
        assert close_numbers({k: got[k] for k in case["output"]}, case["output"]), case
        in_settings = body_for(case)
        if variant:
            in_settings["settings"]["variant"] = variant
        code, got = post(stack, case["skill"], in_settings)
        assert code == 200 and close_numbers({k: got[k] for k in case["output"]}, case["output"]), case


def test_health_and_metrics_show_variants(stack):
    post(stack, "caption", {**body_for(cases_for("ft-beta@7")[0]), "variant": "ft-beta@7"})
    code, body = stack.health()
    assert code == 200
    assert body["model"]["variants"]["available"] == ["ft-alpha@100", "ft-beta@7"]
    assert "ft-beta@7" in body["model"]["variants"]["loaded"]
    with urllib.request.urlopen(stack.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'moondream_model_requests_total{model="moondream2/ft-beta@7"}' in text
    assert "moondream_variants_loaded" in text


@pytest.mark.parametrize("body_extra,status,code,words", [
    ({"variant": "ft-nope@1"}, 404, "variant_not_found", "ft-nope@1"),
    ({"model": "moondream2/ft-nope@1"}, 404, "variant_not_found", "ft-nope@1"),
    ({"model": "gpt-4o"}, 404, "model_not_found", "moondream2"),
    ({"variant": "../../etc"}, 400, "invalid_variant_id", "not a valid variant id"),
    ({"model": "moondream2/a\u0000b"}, 400, "invalid_variant_id", "not a valid variant id"),
    ({"variant": "ft-alpha@100", "model": "moondream2/ft-beta@7"}, 422, "conflicting_variants", "ft-beta@7"),
])
def test_variant_errors(stack, body_extra, status, code, words):
    body = {"image_url": data_url("small_96x64.png"), "length": "short",
            "settings": {"max_tokens": 2}, **body_extra}
    got_status, got = post(stack, "caption", body)
    assert (got_status, got["error"]["code"]) == (status, code), got
    assert words in got["error"]["message"]


def test_model_name_and_alias_select_the_base_model(stack):
    base = cases_for(None, "small_96x64.png")[0]
    for model in ("moondream2", "moondream3-preview"):
        code, got = post(stack, base["skill"], {**body_for(base), "model": model})
        assert code == 200 and got["caption"] == base["output"]["caption"], model


def test_openai_sdk_lists_and_chats_with_variants(stack):
    """GET /v1/models lists each variant as <model name>/<variant id>, and a chat naming one
    gets the reference's answer for that variant (a single-turn chat is exactly the query)."""
    import openai

    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["moondream2", "moondream2/ft-alpha@100", "moondream2/ft-beta@7"]
    assert client.models.retrieve("moondream2/ft-beta@7").id == "moondream2/ft-beta@7"
    cases = [c for c in CASES if c["skill"] == "query" and not c["args"].get("spatial_refs")]
    assert {c["args"]["settings"]["variant"] for c in cases} == {"ft-alpha@100", "ft-beta@7"}
    for case in cases:
        settings = case["args"]["settings"]
        content = case["args"]["question"]
        if case["image"]:
            content = [{"type": "image_url", "image_url": {"url": data_url(case["image"])}},
                       {"type": "text", "text": content}]
        answer = client.chat.completions.create(
            model=f"moondream2/{settings['variant']}", messages=[{"role": "user", "content": content}],
            temperature=settings["temperature"], top_p=settings["top_p"], max_completion_tokens=settings["max_tokens"],
            extra_body={"reasoning": True} if case["args"].get("reasoning") else None)
        assert answer.model == f"moondream2/{settings['variant']}"
        if case["args"].get("reasoning"):
            # max_completion_tokens caps trace and answer together (docs/chat.md): the reference's
            # trace, then as much of its answer as the cap leaves
            assert answer.choices[0].message.reasoning == case["output"]["reasoning"]["text"]
            assert answer.usage.completion_tokens <= settings["max_tokens"]
            assert case["output"]["answer"].startswith(answer.choices[0].message.content.rstrip("\ufffd")), case
        else:
            assert answer.choices[0].message.content == case["output"]["answer"], case
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="moondream2/ft-nope@1", messages=[{"role": "user", "content": "Hi"}])

