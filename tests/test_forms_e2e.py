"""Form bodies and STRICT_FIELDS on the real stack (supervisord, the tiny test model, greedy settings).

`curl -F image=@photo.png -F question=...` (Moondream Station's way), requests' `files=` and
urlencoded fields answer exactly what the JSON route answers.  The stack runs with
STRICT_FIELDS=1, where a field the server does not know is a 422: the official Python client and
the OpenAI SDK must still pass, since they send only fields we know.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request

import moondream as md
import pytest
import requests
from openai import OpenAI
from PIL import Image

from tests.frontend_helpers import SMALL_IMAGE, warm_up
from tests.stack import running_stack

pytestmark = pytest.mark.timeout(300)

IMAGE_URL = "data:image/png;base64," + base64.b64encode(SMALL_IMAGE.read_bytes()).decode()
GREEDY = {"temperature": 0, "top_p": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def stack():
    with running_stack(preprocess_workers=1, STRICT_FIELDS=1) as s:
        warm_up(s)
        yield s


def json_answer(stack, route: str, body: dict) -> dict:
    req = urllib.request.Request(stack.url + route, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def without_ids(answer: dict) -> dict:
    """What the model said (timings and ids differ from call to call)."""
    return {k: v for k, v in answer.items() if k not in ("request_id", "metrics")}


def curl(*args: str) -> tuple[int, dict]:
    done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=120)
    body, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(body)


def test_curl_form_with_an_image_file_answers_like_json(stack):
    question = "What is in the image?"
    want = json_answer(stack, "/v1/query", {"image_url": IMAGE_URL, "question": question, "settings": GREEDY})
    code, got = curl("-F", f"image=@{SMALL_IMAGE}", "-F", f"question={question}",
                     "-F", f"settings={json.dumps(GREEDY)}", stack.url + "/v1/query")
    assert code == 200 and without_ids(got) == without_ids(want), (got, want)

    want = json_answer(stack, "/v1/detect", {"image_url": IMAGE_URL, "object": "dog", "settings": GREEDY})
    code, got = curl("-F", f"image=@{SMALL_IMAGE};type=image/png", "-F", "object=dog",
                     "-F", f"settings={json.dumps(GREEDY)}", stack.url + "/v1/detect")
    assert code == 200 and without_ids(got) == without_ids(want), (got, want)


def test_requests_files_and_urlencoded_fields_answer_like_json(stack):
    want = json_answer(stack, "/v1/caption", {"image_url": IMAGE_URL, "length": "short", "settings": GREEDY})
    with open(SMALL_IMAGE, "rb") as image:
        resp = requests.post(stack.url + "/v1/caption", files={"image": image},
                             data={"length": "short", "settings": json.dumps(GREEDY)}, timeout=120)
    assert resp.status_code == 200 and without_ids(resp.json()) == without_ids(want), resp.text

    resp = requests.post(stack.url + "/v1/caption", timeout=120,  # urlencoded: the image as a data URL
                         data={"image_url": IMAGE_URL, "length": "short", "settings": json.dumps(GREEDY)})
    assert resp.status_code == 200 and without_ids(resp.json()) == without_ids(want), resp.text


def test_a_streamed_form_query_streams(stack):
    with open(SMALL_IMAGE, "rb") as image:
        resp = requests.post(stack.url + "/v1/query", files={"image": image}, timeout=120,
                             data={"question": "Hi?", "stream": "true", "settings": json.dumps(GREEDY)})
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["completed"] is True and all(not e["completed"] for e in events[:-1])


def test_strict_fields_refuses_a_misspelt_field_on_the_stack(stack):
    resp = requests.post(stack.url + "/v1/caption", json={"image_url": IMAGE_URL, "lenght": "short"}, timeout=60)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "unknown_field"
    assert "lenght" in resp.json()["error"]["message"]


def test_official_client_and_openai_sdk_pass_strict_fields(stack):
    model = md.vl(endpoint=stack.url + "/v1")
    image = Image.open(SMALL_IMAGE)
    assert isinstance(model.caption(image, length="short", settings={"max_tokens": 4})["caption"], str)
    assert "".join(model.query(image, "Hi?", stream=True, settings={"max_tokens": 4})["answer"]) is not None
    assert isinstance(model.query(image, "Hi?", reasoning=True, settings={"max_tokens": 4})["answer"], str)
    assert isinstance(model.detect(image, "dog")["objects"], list)
    assert isinstance(model.point(image, "dog")["points"], list)

    client = OpenAI(base_url=stack.url + "/v1", api_key="unused")
    answer = client.chat.completions.create(model="moondream2", max_completion_tokens=4, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}},
                                     {"type": "text", "text": "Hi?"}]}])
    assert answer.choices[0].message.content is not None


def test_the_official_client_works_without_its_heavy_dependencies(stack):
    """README: `pip install moondream --no-deps pillow` is enough for a server: the client imports Kestrel
    (and with it torch) only for local inference.  Here those imports are made impossible."""
    code = ("import sys; sys.modules.update(dict.fromkeys(['kestrel', 'torch', 'transformers', 'numpy'])); "
            "import moondream as md; from PIL import Image; "
            f"model = md.vl(endpoint={stack.url + '/v1'!r}); "
            f"print(model.caption(Image.open({str(SMALL_IMAGE)!r}), length='short', "
            "settings={'max_tokens': 2})['caption'] is not None)")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
