"""OpenAI's chat protocol through the whole stack (supervisord, broker, workers, HTTP),
used by real clients from PyPI: the `openai` SDK and the official `moondream`
client's chat().  The stack requires an API key, so every call also proves that
`Authorization: Bearer` is accepted.

Answers are checked against the reference's answers on the conformance model
(tests/conformance/main/expected.json): a single-turn chat is exactly a query,
so it must give the reference's query tokens, and the same text as /v1/query."""
from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.error
import urllib.request

import moondream as md
import openai
import pytest

from api.chat_schemas import UNSUPPORTED
from tests.engine_helpers import CONFORMANCE
from tests.stack import running_stack
from tests.test_frontend_http import broker_outcome

pytestmark = pytest.mark.timeout(300)

KEY = "chat-test-key"
SET_DIR = os.path.join(CONFORMANCE, "main")
CASES = json.load(open(os.path.join(SET_DIR, "expected.json")))["cases"]
# Every query the chat route can express: one question, at most one image, no spatial references.
QUERY_CASES = [c for c in CASES if c["skill"] == "query" and not c["args"].get("spatial_refs")]


@pytest.fixture(scope="module")
def stack():
    with running_stack(VLM_API_KEY=KEY, preprocess_workers=1) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    # The first generation after start-up is slow, and a GPU worker that registers late
    # makes the broker answer 503 for a moment: wait for one answer.
    end = time.monotonic() + 60
    while True:
        try:
            client.chat.completions.create(model="moondream2", messages=[{"role": "user", "content": "Hi"}],
                                           max_completion_tokens=2)
            return client
        except openai.InternalServerError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def data_url(image_name: str) -> str:
    """The fixture's own bytes: the preprocess workers decode exactly what the reference saw."""
    with open(os.path.join(SET_DIR, "images", image_name), "rb") as f:
        raw = f.read()
    kind = "jpeg" if image_name.endswith(".jpg") else "png"
    return f"data:image/{kind};base64,{base64.b64encode(raw).decode()}"


def user_message(question: str, image_name: str | None) -> dict:
    if image_name is None:
        return {"role": "user", "content": question}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image_name)}},
                                        {"type": "text", "text": question}]}


def post(stack, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"{stack.url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {KEY}", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def chat_kwargs(case) -> dict:
    settings = case["args"]["settings"]
    kwargs = {"model": "moondream2", "messages": [user_message(case["args"]["question"], case["image"])],
              "temperature": settings["temperature"], "top_p": settings["top_p"],
              "max_completion_tokens": settings["max_tokens"]}
    if case["args"].get("reasoning"):
        kwargs["extra_body"] = {"reasoning": True}
    return kwargs


def test_single_turn_chat_is_the_query_on_the_conformance_cases(stack, client):
    """The reference's tokens, and the same answer /v1/query gives, on every expressible case."""
    assert {c["image"] for c in QUERY_CASES} >= {None, "photo_773x767.jpg"}
    assert any(c["args"].get("reasoning") for c in QUERY_CASES)
    for case in QUERY_CASES:
        answer = client.chat.completions.create(**chat_kwargs(case))
        message = answer.choices[0].message
        if case["args"].get("reasoning"):
            continue  # max_completion_tokens caps reasoning and answer together: see the next test
        assert message.content == case["output"]["answer"], case
        body = {"question": case["args"]["question"], "reasoning": case["args"].get("reasoning", False),
                "settings": case["args"]["settings"]}
        if case["image"]:
            body["image_url"] = data_url(case["image"])
        code, query = post(stack, "/v1/query", body, {"Authorization": "", "X-Moondream-Auth": KEY})
        assert code == 200 and query["answer"] == message.content, (case, query)
        assert answer.usage.prompt_tokens == query["metrics"]["input_tokens"]
        assert answer.usage.completion_tokens == query["metrics"]["output_tokens"]


def test_max_completion_tokens_caps_reasoning_and_answer_together(stack, client):
    """OpenAI's meaning: reasoning tokens count against max_completion_tokens.  The trace is the
    reference's (it has its own cap of the same number); the answer gets what is left, so it is
    the start of /v1/query's answer, which caps the two separately as the reference does."""
    cases = [c for c in QUERY_CASES if c["args"].get("reasoning")]
    assert cases
    for case in cases:
        limit = case["args"]["settings"]["max_tokens"]
        answer = client.chat.completions.create(**chat_kwargs(case))
        message, usage = answer.choices[0].message, answer.usage
        reference = case["output"]["reasoning"]
        assert message.reasoning == reference["text"] and message.reasoning_details == {"grounding": reference["grounding"]}
        assert usage.completion_tokens <= limit, (case, usage)
        body = {"question": case["args"]["question"], "reasoning": True, "settings": case["args"]["settings"]}
        if case["image"]:
            body["image_url"] = data_url(case["image"])
        code, query = post(stack, "/v1/query", body, {"Authorization": "", "X-Moondream-Auth": KEY})
        assert code == 200 and query["answer"] == case["output"]["answer"]
        if query["metrics"]["output_tokens"] > limit:  # the two together ran past the cap: cut, and said so
            assert answer.choices[0].finish_reason == "length" and usage.completion_tokens == limit
        assert query["answer"].startswith(message.content.rstrip("\ufffd")), (message.content, query["answer"])


def test_plain_chat_with_the_openai_sdk(client):
    answer = client.chat.completions.create(model="moondream2", temperature=0, max_tokens=6,
                                            messages=[{"role": "user", "content": "Say hello."}])
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == "moondream2" and abs(answer.created - time.time()) < 300
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.completion_tokens <= 6 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_with_usage_and_an_image_part(client):
    case = next(c for c in QUERY_CASES if c["image"] == "tall_300x1500.png" and not c["args"].get("reasoning"))
    whole = client.chat.completions.create(**chat_kwargs(case))
    chunks = list(client.chat.completions.create(**chat_kwargs(case), stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == case["output"]["answer"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    *body, finish, usage = chunks
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage.choices == [] and usage.usage == whole.usage
    assert all(c.usage is None for c in body)


def test_reasoning_through_extra_body(client):
    case = next(c for c in QUERY_CASES if c["args"].get("reasoning") and c["image"] == "photo_773x767.jpg")
    answer = client.chat.completions.create(**chat_kwargs(case))
    message = answer.choices[0].message
    assert message.reasoning == case["output"]["reasoning"]["text"]
    assert message.reasoning_details["grounding"] == case["output"]["reasoning"]["grounding"]
    streamed = list(client.chat.completions.create(**chat_kwargs(case), stream=True))
    last = [c for c in streamed if c.choices][-1]
    assert last.choices[0].delta.reasoning == message.reasoning


def test_unknown_model_is_a_404_listing_the_served_ids(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    error = caught.value.body
    assert caught.value.code == "model_not_found" and error["param"] == "model"
    assert "moondream2" in error["message"]


def test_wrong_key_is_a_401(stack):
    wrong = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="moondream2", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == ["moondream2"]
    assert client.models.retrieve("moondream2").id == "moondream2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("moondream2/ft-none@1")


def test_aliases_answer_and_the_response_says_which_model(client):
    answer = client.chat.completions.create(model="moondream3-preview", max_completion_tokens=2,
                                            messages=[{"role": "user", "content": "Hi"}])
    assert answer.model == "moondream2"


def test_moondream_client_chat_without_a_model(stack):
    model = md.vl(endpoint=f"{stack.url}/v1", api_key=KEY)
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is this?"},
                {"role": "assistant", "content": "A test."},
                {"role": "user", "content": "Say more."}]
    settings = {"temperature": 0, "max_tokens": 8}
    whole = model.chat(messages, settings=settings)
    assert whole["message"]["role"] == "assistant" and whole["finish_reason"] in ("stop", "length")
    streamed = "".join(model.chat(messages, stream=True, settings=settings)["message"])
    assert streamed == whole["message"]["content"]


def test_segment_is_refused_for_good(stack):
    model = md.vl(endpoint=f"{stack.url}/v1", api_key=KEY)
    with pytest.raises(urllib.error.HTTPError) as caught:
        model.segment(data_url_image(), "cat")
    assert caught.value.code == 501 and "Retry-After" not in caught.value.headers
    body = json.loads(caught.value.read())
    assert body["error"]["code"] == "not_supported_by_model" and "Moondream 3" in body["error"]["message"]


def data_url_image():
    from moondream.types import Base64EncodedImage
    return Base64EncodedImage(image_url=data_url("small_96x64.png"))


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("n", 2), ("logprobs", True),
    ("top_logprobs", 2), ("logit_bias", {"1": 5}), ("response_format", {"type": "json_object"}),
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("presence_penalty", 0.5),
    ("frequency_penalty", 0.5), ("reasoning_effort", "high"), ("web_search_options", {}),
])
def test_every_unsupported_field_is_a_400_naming_it(stack, field, value):
    code, body = post(stack, "/v1/chat/completions",
                      {"model": "moondream2", "messages": [{"role": "user", "content": "Hi"}], field: value})
    assert code == 400 and body["error"]["param"] == field and field in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "unsupported_parameter"


def test_the_unsupported_fields_list_is_covered():
    tested = {"tools", "tool_choice", "functions", "function_call", "n", "logprobs", "top_logprobs", "logit_bias",
              "response_format", "audio", "modalities", "prediction", "presence_penalty", "frequency_penalty",
              "reasoning_effort", "web_search_options"}
    assert tested == set(UNSUPPORTED)


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "x", "tool_call_id": "1"}, "messages[0].role"),
    ({"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}, "messages[0].tool_calls"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]},
     "messages[0].content[0].type"),
])
def test_tool_messages_and_audio_parts_are_400s(stack, message, param):
    code, body = post(stack, "/v1/chat/completions", {"messages": [message, {"role": "user", "content": "Hi"}]})
    assert code == 400 and body["error"]["param"] == param, body


def test_neutral_values_of_unsupported_fields_are_accepted(stack):
    code, body = post(stack, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 1, "logprobs": False,
        "tools": [], "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0})
    assert code == 200, body


def test_two_images_are_a_422(stack):
    image = {"type": "image_url", "image_url": {"url": data_url("small_96x64.png")}}
    code, body = post(stack, "/v1/chat/completions", {"messages": [
        {"role": "user", "content": [image, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [image, {"type": "text", "text": "And this?"}]}]})
    assert code == 422 and body["error"]["code"] == "too_many_images"
    assert "one image per question" in body["error"]["message"]


def test_stop_sequences_cut_the_answer(client):
    case = next(c for c in QUERY_CASES if c["image"] == "tall_300x1500.png" and not c["args"].get("reasoning"))
    full = case["output"]["answer"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop and full.find(stop) > 0
    expected = full[:full.find(stop)]
    whole = client.chat.completions.create(**chat_kwargs(case), stop=[stop])
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    for options in ({"include_usage": True}, None):
        chunks = list(client.chat.completions.create(**chat_kwargs(case), stop=stop, stream=True,
                                                     stream_options=options))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "stop"


def test_seed_gives_repeatable_samples(client):
    kwargs = {"model": "moondream2", "messages": [{"role": "user", "content": "Tell a story."}],
              "temperature": 1.0, "top_p": 1.0, "max_completion_tokens": 12}
    runs = [client.chat.completions.create(**kwargs, seed=seed).choices[0].message.content for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the tiny model's 512-token vocabulary makes a collision unlikely


def test_client_that_hangs_up_cancels_the_generation(stack):
    """A long streamed chat whose client goes away stops running on the GPU worker."""
    body = json.dumps({"messages": [{"role": "user", "content": "Count forever."}], "stream": True,
                       "max_completion_tokens": 1500, "temperature": 1.0}).encode()
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer %s\r\nX-Request-ID: chat-hangup\r\nContent-Length: %d\r\n\r\n"
                     % (KEY.encode(), len(body)) + body)
        head = b""
        while b"data: " not in head:  # headers and the first event, then hang up
            head += sock.recv(4096)
    assert "code=cancelled" in broker_outcome(stack, "chat-hangup"), stack.log("broker")[-1000:]


def test_metrics_count_the_chat_routes(stack, client):
    client.models.list()
    with urllib.request.urlopen(f"{stack.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'route="/v1/chat/completions"' in text and 'route="/v1/models"' in text


@pytest.mark.parametrize("headers, status", [
    ({}, 200),  # post() sends the right Bearer key
    ({"Authorization": "", "X-Moondream-Auth": KEY}, 200),
    ({"Authorization": "Bearer wrong", "X-Moondream-Auth": KEY}, 200),  # either header may hold it
    ({"Authorization": f"Basic {KEY}"}, 401),  # only the Bearer scheme
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": ""}, 401),
])
def test_bearer_key_works_on_the_moondream_routes_too(stack, headers, status):
    body = {"image_url": data_url("small_96x64.png"), "length": "short", "settings": {"max_tokens": 2}}
    code, answer = post(stack, "/v1/caption", body, headers)
    assert code == status, answer
    if status == 401:
        assert answer["error"]["code"] == "unauthorized" and "Bearer" in answer["error"]["message"]
