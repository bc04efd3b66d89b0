"""GET /openapi.json of a running stack, checked by schemathesis against the stack itself.

Schemathesis generates requests from the document (valid ones, then invalid
ones), sends them, and checks every answer: no server error (503 and 504 are
allowed: they are the documented answers to overload), a documented status,
content type and headers, and a body that matches the documented schema.
Image fields are data URLs, and the generated ones are almost never images, so
most generated requests prove that bad input gets a 4xx; a few hand-written
cases with a real image cover the successful answers, streamed and not.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import falcon.inspect
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from frontend.app import create_app
from api.chat_schemas import MISSING_SKILL_STATUS, MISSING_SKILLS
from frontend.openapi import build_spec
from tests.frontend_helpers import SMALL_IMAGE, warm_up
from tests.stack import config_from_env, running_stack

pytestmark = pytest.mark.timeout(300)

# Generated requests that are valid reach the tiny model on the CPU (about
# 60 ms a token here): a low MAX_TOKENS_LIMIT (written into the document as
# settings.max_tokens' maximum) keeps each of them short, and requests that
# leave max_tokens out get it filled in (the default is 768 tokens).
MAX_TOKENS_LIMIT = 16
# The model's context is 2048 positions; a question of 4000 characters (the
# default MAX_TEXT_CHARS) may not fit, and the GPU worker answers that with a
# 500 generation_failed (a known bug: it should be a 4xx).  Up to 3 tokens a character.
MAX_TEXT_CHARS = 400
HTTP_TIMEOUT_S = 60  # a request that takes longer is a failure, not a hung test
EXAMPLES = 20  # per operation and generation mode: about a minute in all on a loaded 2-core machine

SKILL_ROUTES = ["/v1/caption", "/v1/query", "/v1/detect", "/v1/point"]
GET_ROUTES = ["/health", "/health/live", "/metrics", "/openapi.json", "/docs", "/"]
# OpenAI's protocol (frontend/chat.py), and the skills Moondream 2 lacks (501).
OPENAI_POST_ROUTES = ["/v1/chat/completions"]
OPENAI_GET_ROUTES = ["/v1/models", "/v1/models/{model_id}"]
MISSING_SKILL_ROUTES = list(MISSING_SKILLS)
# The Batch API (frontend/batch_api.py): one operation per method; each takes its own `action`.
BATCH_OPERATIONS = [("POST", "/v1/batch"), ("GET", "/v1/batch"), ("PUT", "/v1/batch/{item_id}"),
                    ("POST", "/v1/batch/{item_id}"), ("DELETE", "/v1/batch/{item_id}"), ("GET", "/v1/batch/{item_id}"),
                    ("POST", "/v1/batch/{item_id}/cancel"), ("GET", "/v1/batch/{item_id}/results/{index}")]


@schemathesis.check
def no_server_error(ctx, response, case) -> None:
    """500 is a bug; 503 (no worker) and 504 (deadline) are documented answers to load,
    and 501 the documented answer of a skill Moondream 2 does not have."""
    if response.status_code == MISSING_SKILL_STATUS and case.operation.path in MISSING_SKILLS:
        return
    if response.status_code >= 500 and response.status_code not in (503, 504):
        raise AssertionError(f"{case.operation.label} answered {response.status_code}: {response.text[:500]}")


CHECKS = [no_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def stack():
    with running_stack(MAX_TOKENS_LIMIT=MAX_TOKENS_LIMIT, MAX_TEXT_CHARS=MAX_TEXT_CHARS) as s:
        warm_up(s)
        yield s


@pytest.fixture(scope="module")
def api(stack):
    return schemathesis.openapi.from_url(stack.url + "/openapi.json")


def test_document_describes_every_route_from_the_schemas(stack, api):
    spec = api.raw_schema
    operations = {f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item}
    assert operations == ({f"POST {p}" for p in SKILL_ROUTES + OPENAI_POST_ROUTES + MISSING_SKILL_ROUTES}
                          | {f"GET {p}" for p in GET_ROUTES + OPENAI_GET_ROUTES}
                          | {f"{method} {path}" for method, path in BATCH_OPERATIONS})
    components = spec["components"]["schemas"]
    # Request bodies are the front end's own msgspec Structs, with the configured limits.
    assert components["Settings"]["properties"]["max_tokens"]["maximum"] == MAX_TOKENS_LIMIT
    assert components["CaptionRequest"]["required"] == ["image_url"]
    assert {"StreamChunk", "StreamEnd", "StreamError", "ErrorBody"} <= set(components)
    assert {"ChatRequest", "ChatCompletion", "ChatCompletionChunk", "OpenAIError", "ModelList"} <= set(components)
    assert components["ChatRequest"]["properties"]["max_completion_tokens"]["maximum"] == MAX_TOKENS_LIMIT
    chat_200 = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat_200) == {"application/json", "text/event-stream"}
    query_200 = spec["paths"]["/v1/query"]["post"]["responses"]["200"]["content"]
    assert set(query_200) == {"application/json", "text/event-stream"}
    with urllib.request.urlopen(stack.url + "/docs", timeout=10) as resp:
        page = resp.read().decode()
    assert resp.headers["Content-Type"].startswith("text/html")
    assert "openapi.json" in page and "<script src" not in page  # renders the document, loads nothing else


def test_every_route_the_app_serves_is_documented(stack, api):
    """The app's own routing table (Falcon's inspect), every method a resource implements,
    against the document: a route added without its description fails here."""
    from broker_client.client import BrokerClient

    broker = BrokerClient(stack.config)
    try:
        app = create_app(stack.config, broker)
    finally:
        broker.close()
    served = {f"{method.method} {re.sub(r':[a-z]+}', '}', route.path)}"
              for route in falcon.inspect.inspect_routes(app) for method in route.methods if not method.internal}
    documented = {f"{method.upper()} {path}" for path, item in api.raw_schema["paths"].items() for method in item}
    assert served == documented


def few_tokens(case):
    """Give a generated body that leaves max_tokens out a small one."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("settings") or {}, dict):
        body["settings"] = {"max_tokens": MAX_TOKENS_LIMIT, **(body.get("settings") or {})}
    return case


def test_the_document_is_openapi_3_1_without_3_2_fields():
    """3.1.0, which common generators read: no 3.2-only field (itemSchema) anywhere; a stream's
    schema describes one event (SSE) or one line (JSONL)."""
    spec = build_spec(config_from_env({}))
    assert spec["openapi"] == "3.1.0"
    assert "itemSchema" not in json.dumps(spec)
    query_stream = spec["paths"]["/v1/query"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert query_stream["required"] == ["data"]


def test_api_key_is_documented_only_when_required():
    """With VLM_API_KEY set the document names the header and the 401 answer."""
    open_spec = build_spec(config_from_env({}))
    keyed = build_spec(config_from_env({"VLM_API_KEY": "k"}))
    assert "securitySchemes" not in open_spec["components"]
    assert "401" not in open_spec["paths"]["/v1/query"]["post"]["responses"]
    assert keyed["components"]["securitySchemes"]["apiKey"] == {
        "type": "apiKey", "in": "header", "name": "X-Moondream-Auth"}
    assert keyed["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path in SKILL_ROUTES + OPENAI_POST_ROUTES + MISSING_SKILL_ROUTES:
        operation = keyed["paths"][path]["post"]
        assert operation["security"] == [{"apiKey": []}, {"bearer": []}] and "401" in operation["responses"]
    for path in OPENAI_GET_ROUTES:
        assert "401" in keyed["paths"][path]["get"]["responses"]
    for method, path in BATCH_OPERATIONS:
        operation = keyed["paths"][path][method.lower()]
        assert operation["security"] == [{"apiKey": []}, {"bearer": []}] and "401" in operation["responses"]
        assert "401" not in open_spec["paths"][path][method.lower()]["responses"]
    assert "security" not in keyed["paths"]["/health"]["get"]  # health and docs stay open


def _run_generated(api, method: str, path: str, mode: GenerationMode) -> None:
    operation = api[path][method]

    @given(case=operation.as_strategy(generation_mode=mode).map(few_tokens))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(checks=CHECKS, timeout=HTTP_TIMEOUT_S)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("path", SKILL_ROUTES + OPENAI_POST_ROUTES + MISSING_SKILL_ROUTES)
def test_generated_requests_conform(api, path, mode):
    _run_generated(api, "POST", path, mode)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("method, path", BATCH_OPERATIONS)
def test_generated_batch_requests_conform(api, method, path, mode):
    """Generated ids name no upload or job, so these prove the 400s and 404s (and a new upload per mpu-create)."""
    _run_generated(api, method, path, mode)


def test_a_batch_job_conforms_from_upload_to_results(api):
    """Every batch operation with ids that exist, through a real job (the stack's batch worker
    runs it): each answer is checked against the document, the result lines too."""
    from api.batch_schemas import ResultLineError, ResultLineOk

    def call(method: str, path: str, **kwargs):
        response = api[path][method].Case(**kwargs).call_and_validate(checks=CHECKS, timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200, response.text
        return response

    lines = [{"id": "a", "skill": "caption", "image": IMAGE_URL.split(",", 1)[1], "length": "short", "settings": FEW},
             {"id": "b", "skill": "no-such-skill", "image": ""}]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = call("POST", "/v1/batch", query={"action": "mpu-create"}).json()
    dropped = call("POST", "/v1/batch", query={"action": "mpu-create"}).json()
    call("DELETE", "/v1/batch/{item_id}", path_parameters={"item_id": dropped["fileId"]},
         query={"action": "mpu-abort", "uploadId": dropped["uploadId"]})
    part = call("PUT", "/v1/batch/{item_id}", path_parameters={"item_id": upload["fileId"]},
                query={"action": "mpu-uploadpart", "uploadId": upload["uploadId"], "partNumber": 1},
                body=data, media_type="application/octet-stream").json()
    assert part == {"etag": hashlib.md5(data).hexdigest(), "partNumber": 1}
    job = call("POST", "/v1/batch/{item_id}", path_parameters={"item_id": upload["fileId"]},
               query={"action": "mpu-complete", "uploadId": upload["uploadId"]},
               body={"parts": [part]}, media_type="application/json").json()
    item = {"item_id": job["id"]}
    for _ in range(600):  # the tiny model answers in seconds; bounded at 60 s
        status = call("GET", "/v1/batch/{item_id}", path_parameters=item).json()
        if status["status"] == "completed":
            break
        time.sleep(0.1)
    assert status["progress"] == {"total": 2, "completed": 1, "failed": 1}, status
    listed = call("GET", "/v1/batch", query={"limit": 1}).json()
    assert listed["data"][0]["id"] == job["id"]
    if listed["has_more"]:
        call("GET", "/v1/batch", query={"limit": 1, "cursor": listed["next_cursor"]})
    past_sqlite = api["/v1/batch"]["GET"].Case(query={"cursor": str(2 ** 64)})  # once a 500 (OverflowError)
    assert past_sqlite.call_and_validate(checks=CHECKS, timeout=HTTP_TIMEOUT_S).status_code == 400
    assert call("POST", "/v1/batch/{item_id}/cancel", path_parameters=item).json()["status"] == "completed"
    results = call("GET", "/v1/batch/{item_id}/results/{index}", path_parameters={**item, "index": 0})
    assert results.headers["content-type"][0].startswith("application/jsonl")
    result_lines = results.text.splitlines()
    assert len(result_lines) == 2
    ok, error = result_lines
    assert msgspec.json.decode(ok, type=ResultLineOk).id == "a"
    assert msgspec.json.decode(error, type=ResultLineError).error.code == "unknown_skill"


def test_generated_model_ids_conform(api):
    # Positive only: any string is a valid path segment, so there is no invalid one to generate.
    _run_generated(api, "GET", "/v1/models/{model_id}", GenerationMode.POSITIVE)


def test_get_routes_conform(api):
    for path in GET_ROUTES + ["/v1/models"]:
        operation = api[path]["GET"]
        operation.Case().call_and_validate(checks=CHECKS, timeout=HTTP_TIMEOUT_S)


IMAGE_URL = "data:image/png;base64," + base64.b64encode(SMALL_IMAGE.read_bytes()).decode()
FEW = {"temperature": 0, "max_tokens": 4, "max_objects": 2}


@pytest.mark.parametrize("path, body", [
    ("/v1/caption", {"image_url": IMAGE_URL, "length": "short", "settings": FEW}),
    ("/v1/caption", {"image_url": IMAGE_URL, "stream": True, "settings": FEW}),
    ("/v1/query", {"image_url": IMAGE_URL, "question": "What is it?", "reasoning": True, "settings": FEW}),
    ("/v1/query", {"question": "Hello?", "stream": True, "settings": FEW}),
    ("/v1/detect", {"image_url": IMAGE_URL, "object": "cat", "settings": FEW}),
    ("/v1/point", {"image_url": IMAGE_URL, "object": "cat", "settings": FEW}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": IMAGE_URL}}, {"type": "text", "text": "What is it?"}]}],
        "reasoning": True, "temperature": 0, "max_completion_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hello?"}],
                              "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4}),
])
def test_real_answers_conform(api, path, body):
    response = api[path]["POST"].Case(body=body).call_and_validate(checks=CHECKS, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200, response.text
    if body.get("stream"):
        assert response.headers["content-type"][0].startswith("text/event-stream")
        assert '"completed":true' in response.text or response.text.endswith("data: [DONE]\n\n")



CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                    reason="chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")
def test_docs_page_renders_the_document(stack, api):
    """/docs builds its route list in the browser from /openapi.json, with no network beyond the server."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    user_data = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", f"--user-data-dir={user_data}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(stack.url + "/docs")
        operations = sum(len(item) for item in api.raw_schema["paths"].values())
        WebDriverWait(driver, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".op")) == operations)
        paths = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".op .path")]
        assert set(paths) == set(api.raw_schema["paths"])
        for header in driver.find_elements(By.CSS_SELECTOR, ".op > div:first-child"):
            path = header.find_element(By.CSS_SELECTOR, ".path").text
            assert header.text.count(path) == 1, header.text  # method and path once, then the summary
        # The page names its icon (none), so the browser does not ask for a missing /favicon.ico.
        assert driver.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href") == "data:,"
        assert driver.find_element(By.ID, "schema-QueryRequest").text == "QueryRequest"
        assert "question" in driver.find_element(By.ID, "schemas").text
        assert driver.find_element(By.ID, "title").text == api.raw_schema["info"]["title"]
    finally:
        driver.quit()
        shutil.rmtree(user_data, ignore_errors=True)
