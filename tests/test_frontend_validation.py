"""Malformed requests to the front end get the right 4xx, as JSON.

Everything here is rejected before the broker would be asked, so the app runs
with `RejectingBrokerStandIn`, which fails the test if it is called at all.
The one fault-injection case (a broker client that raises) checks that a bug
becomes a logged JSON 500 and not a crash.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import logging

import falcon.testing
import pytest
from PIL import Image

from api.images import decode_base64
from frontend.app import create_app
from api.schemas import MAX_SPATIAL_REFS
from shared.config import Config, load_config

API_KEY = "test-key-123"


class RejectingBrokerStandIn:
    """Stands in for BrokerClient where no request may reach the broker."""

    def __init__(self):
        self.calls = []

    def submit(self, msg, image):
        self.calls.append(("submit", msg))
        pytest.fail(f"request reached the broker: {msg}")  # BaseException: escapes Falcon's handlers

    def status(self, timeout=1.0):
        self.calls.append(("status", None))
        pytest.fail("/health reached the broker")

    def close(self):
        pass


class ExplodingBrokerStandIn(RejectingBrokerStandIn):
    """Fault injection: the broker client raises as if it had a bug."""

    def submit(self, msg, image):
        self.calls.append(("submit", msg))
        raise RuntimeError("injected fault")


def png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE = png_data_url()


@pytest.fixture(scope="module")
def config():
    # Small limits so the "too large" / "too long" cases stay cheap.
    return dataclasses.replace(load_config(), api_key="", max_body_bytes=64 * 1024,
                               max_text_chars=100, max_tokens_limit=512, max_objects_limit=20)


@pytest.fixture
def broker():
    stand_in = RejectingBrokerStandIn()
    yield stand_in
    assert stand_in.calls == []


@pytest.fixture
def client(config, broker):
    return falcon.testing.TestClient(create_app(config, broker))


def post(client, path, body, headers=None):
    return client.simulate_post(path, body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})})


def assert_error(result, status, code=None, message_part=None):
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    body = result.json
    assert set(body) == {"error", "request_id"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["request_id"] == result.headers["x-request-id"]
    if code is not None:
        assert body["error"]["code"] == code
    if message_part is not None:
        assert message_part in body["error"]["message"]


# ---------------------------------------------------------------- body, JSON, content type
@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"image_url": "x",}', b"\xff\xfe"])
def test_bad_json_is_400(client, raw):
    result = client.simulate_post("/v1/caption", body=raw, headers={"Content-Type": "application/json"})
    assert_error(result, 400, "invalid_json")


@pytest.mark.parametrize("raw", [b"[]", b'"caption"', b"42", b"null"])
def test_json_that_is_not_an_object_is_400(client, raw):
    assert_error(client.simulate_post("/v1/caption", body=raw, headers={"Content-Type": "application/json"}),
                 400, "invalid_request")


def test_empty_body_is_400(client):
    assert_error(client.simulate_post("/v1/caption", body=b"", headers={"Content-Type": "application/json"}), 400)


@pytest.mark.parametrize("content_type", [None, "text/plain", "image/png"])
def test_a_body_neither_json_nor_a_form_is_415(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    result = client.simulate_post("/v1/caption", body=json.dumps({"image_url": IMAGE}), headers=headers)
    assert_error(result, 415, "unsupported_media_type", "or a form (multipart/form-data")


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_json_sent_as_a_form_is_a_400_saying_the_form_cannot_be_read(client, content_type):
    result = client.simulate_post("/v1/caption", body=json.dumps({"image_url": IMAGE}),
                                  headers={"Content-Type": content_type})
    assert_error(result, 400, "invalid_form")


# ---------------------------------------------------------------- form bodies (Moondream Station's way)
def multipart(fields: dict, image: bytes | None = None) -> tuple[bytes, dict]:
    """A multipart/form-data body as curl -F builds it (urllib3's encoder, as requests' files= uses)."""
    from urllib3 import encode_multipart_formdata

    parts = dict(fields)
    if image is not None:
        parts["image"] = ("photo.png", image, "image/png")
    body, content_type = encode_multipart_formdata(parts)
    return body, {"Content-Type": content_type}


PNG_BYTES = base64.b64decode(IMAGE.split(",", 1)[1])


@pytest.mark.parametrize("fields, status, code, words", [
    ({"length": "huge"}, 422, "invalid_value", "length must be one of"),               # the same check as JSON
    ({"settings": "{max_tokens: 5}"}, 400, "invalid_form", "field `settings` must hold JSON text"),
    ({"settings": '{"max_tokens": 0}'}, 422, "invalid_value", "settings.max_tokens must be between"),
    ({"settings": '{"max_tokens": "many"}'}, 400, "invalid_request", "settings.max_tokens"),
    ({"stream": "perhaps"}, 400, "invalid_request", "$.stream"),
    ({"image_url": IMAGE}, 400, "invalid_form", "either as the `image` file part or as `image_url`"),
])
def test_form_fields_get_the_json_routes_checks(client, fields, status, code, words):
    body, headers = multipart(fields, PNG_BYTES)
    assert_error(client.simulate_post("/v1/caption", body=body, headers=headers), status, code, words)


def test_a_form_without_an_image_says_what_is_missing(client):
    body, headers = multipart({"length": "short"})
    assert_error(client.simulate_post("/v1/caption", body=body, headers=headers), 400, "invalid_request", "image_url")


def test_an_empty_image_part_is_400(client):
    body, headers = multipart({"object": "dog"}, b"")
    assert_error(client.simulate_post("/v1/detect", body=body, headers=headers), 400, "invalid_image")


def test_urlencoded_fields_get_the_same_checks(client):
    from urllib.parse import urlencode

    body = urlencode({"question": "", "image_url": IMAGE})
    result = client.simulate_post("/v1/query", body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_error(result, 422, "invalid_value", "question must not be empty")


def test_an_oversized_form_is_413_with_the_same_message(client, config):
    body, headers = multipart({"length": "short"}, b"\0" * config.max_body_bytes)
    assert_error(client.simulate_post("/v1/caption", body=body, headers=headers), 413, "payload_too_large",
                 f"larger than MAX_BODY_BYTES ({config.max_body_bytes} bytes)")


# ---------------------------------------------------------------- unknown top-level fields
def test_strict_fields_makes_an_unknown_field_a_422_naming_it(config, broker):
    strict = falcon.testing.TestClient(create_app(dataclasses.replace(config, strict_fields=True), broker))
    result = post(strict, "/v1/caption", {"image_url": IMAGE, "lenght": "short"})
    assert_error(result, 422, "unknown_field", "unknown field lenght (the server runs with STRICT_FIELDS=1)")
    body, headers = multipart({"lenght": "short"}, PNG_BYTES)  # a form's fields are the same fields
    assert_error(strict.simulate_post("/v1/caption", body=body, headers=headers), 422, "unknown_field", "lenght")


def test_json_content_type_with_charset_is_accepted(client):
    # Gets past the content-type check to the length check (422), so it was read as JSON.
    result = client.simulate_post("/v1/caption", body=json.dumps({"image_url": IMAGE, "length": "huge"}),
                                  headers={"Content-Type": "application/json; charset=utf-8"})
    assert_error(result, 422)


def test_oversized_body_is_413(client, config):
    big = {"image_url": "data:image/png;base64," + "A" * config.max_body_bytes}
    assert_error(post(client, "/v1/caption", big), 413, "payload_too_large")


def test_body_at_the_limit_is_read(client, config):
    # Exactly max_body_bytes: not too large; rejected later for its length value.
    body = {"image_url": IMAGE, "length": "huge", "pad": ""}
    body["pad"] = "x" * (config.max_body_bytes - len(json.dumps(body)))
    assert len(json.dumps(body)) == config.max_body_bytes
    assert_error(post(client, "/v1/caption", body), 422)


# ---------------------------------------------------------------- missing and wrong-typed fields (400)
@pytest.mark.parametrize("path, body, field", [
    ("/v1/caption", {}, "image_url"),
    ("/v1/caption", {"length": "short"}, "image_url"),
    ("/v1/query", {"image_url": IMAGE}, "question"),
    ("/v1/detect", {"image_url": IMAGE}, "object"),
    ("/v1/detect", {"object": "face"}, "image_url"),
    ("/v1/point", {"image_url": IMAGE}, "object"),
])
def test_missing_field_is_400(client, path, body, field):
    assert_error(post(client, path, body), 400, "invalid_request", field)


@pytest.mark.parametrize("path, body, where", [
    ("/v1/caption", {"image_url": 5}, "$.image_url"),
    ("/v1/caption", {"image_url": IMAGE, "length": 3}, "$.length"),
    ("/v1/caption", {"image_url": IMAGE, "stream": "yes"}, "$.stream"),
    ("/v1/caption", {"image_url": IMAGE, "settings": [0.5]}, "$.settings"),
    ("/v1/caption", {"image_url": IMAGE, "settings": {"max_tokens": "100"}}, "$.settings.max_tokens"),
    ("/v1/caption", {"image_url": IMAGE, "settings": {"max_tokens": 10.5}}, "$.settings.max_tokens"),
    ("/v1/caption", {"image_url": IMAGE, "settings": {"temperature": True}}, "$.settings.temperature"),
    ("/v1/query", {"question": ["why"]}, "$.question"),
    ("/v1/query", {"question": "why?", "reasoning": "no"}, "$.reasoning"),
    ("/v1/query", {"question": "why?", "image_url": IMAGE, "spatial_refs": [0.1, 0.2]}, "$.spatial_refs[0]"),
    ("/v1/query", {"question": "why?", "image_url": IMAGE, "spatial_refs": [["a", "b"]]}, "$.spatial_refs[0][0]"),
    ("/v1/detect", {"image_url": IMAGE, "object": None}, "$.object"),
    ("/v1/point", {"image_url": IMAGE, "object": "x", "settings": {"max_objects": "3"}}, "$.settings.max_objects"),
])
def test_wrong_type_is_400_and_names_the_field(client, path, body, where):
    assert_error(post(client, path, body), 400, "invalid_request", where)


# ---------------------------------------------------------------- image_url (400 / 415)
def test_remote_image_url_is_refused(client):
    for url in ("http://example.com/cat.jpg", "https://example.com/cat.jpg", "HTTPS://example.com/a.png"):
        assert_error(post(client, "/v1/caption", {"image_url": url}), 400, "remote_image_disabled",
                     "remote image URLs are disabled")


@pytest.mark.parametrize("url", [
    "", "cat.jpg", "file:///etc/passwd", "ftp://example.com/cat.jpg",
    "data:image/png,iVBORw0KGgo",        # not base64-flagged
    "data:image/png;base64",             # no comma, no data
])
def test_malformed_image_url_is_400(client, url):
    assert_error(post(client, "/v1/caption", {"image_url": url}), 400, "invalid_image_url")


@pytest.mark.parametrize("url", [
    "data:image/png;base64,@@@@",
    "data:image/png;base64,iVBORw0KGgo=AAAA",   # data after padding
    "data:image/png;base64,iVBORw0KGgo",        # length not a multiple of 4
    "data:image/png;base64,iVBOR\u00e9w0KGgo=",  # non-ASCII
])
def test_bad_base64_is_400(client, url):
    assert_error(post(client, "/v1/caption", {"image_url": url}), 400, "invalid_base64")


def test_the_fast_base64_decoder_agrees_with_the_standard_library():
    """decode_base64 (pybase64 first) gives b64decode(validate=True)'s bytes, or fails where it fails,
    on every input of up to 5 characters over an alphabet with each kind of trouble, and on a big one."""
    alphabet = "QUI/+=\n é"
    inputs = [""]
    for length in range(5):
        inputs += [s + c for s in inputs[-len(alphabet) ** length:] for c in alphabet]
    inputs.append(base64.b64encode(bytes(range(256)) * 1500).decode())

    def outcome(decode, data):
        try:
            return decode(data)
        except (binascii.Error, ValueError):
            return "refused"

    disagree = [d for d in inputs if outcome(decode_base64, d) != outcome(lambda x: base64.b64decode(x, validate=True), d)]
    assert not disagree, disagree[:5]
    assert sum(outcome(decode_base64, d) != "refused" for d in inputs) > 1000  # not only refusals


def test_empty_image_is_400(client):
    assert_error(post(client, "/v1/detect", {"image_url": "data:image/png;base64,", "object": "x"}), 400, "invalid_image")


@pytest.mark.parametrize("url", ["data:text/plain;base64,aGVsbG8=", "data:application/pdf;base64,JVBERi0=", "data:;base64,aGVsbG8="])
def test_data_url_that_is_not_an_image_is_415(client, url):
    assert_error(post(client, "/v1/caption", {"image_url": url}), 415, "unsupported_media_type")


# ---------------------------------------------------------------- values that make no sense (422)
@pytest.mark.parametrize("path, body, message_part", [
    ("/v1/caption", {"image_url": IMAGE, "length": "huge"}, "length"),
    ("/v1/caption", {"image_url": IMAGE, "settings": {"max_tokens": 0}}, "max_tokens"),
    ("/v1/caption", {"image_url": IMAGE, "settings": {"max_tokens": 513}}, "max_tokens"),
    ("/v1/caption", {"image_url": IMAGE, "settings": {"temperature": -0.1}}, "temperature"),
    ("/v1/caption", {"image_url": IMAGE, "settings": {"top_p": 1.5}}, "top_p"),
    ("/v1/caption", {"image_url": IMAGE, "settings": {"top_p": -0.2}}, "top_p"),
    ("/v1/detect", {"image_url": IMAGE, "object": "x", "settings": {"max_objects": 0}}, "max_objects"),
    ("/v1/detect", {"image_url": IMAGE, "object": "x", "settings": {"max_objects": 21}}, "max_objects"),
    ("/v1/query", {"question": ""}, "question"),
    ("/v1/query", {"question": "   "}, "question"),
    ("/v1/query", {"question": "q" * 101}, "question"),
    ("/v1/detect", {"image_url": IMAGE, "object": ""}, "object"),
    ("/v1/point", {"image_url": IMAGE, "object": "o" * 101}, "object"),
    ("/v1/query", {"question": "what is here?", "spatial_refs": [[0.5, 0.5]]}, "need an image"),
    ("/v1/query", {"question": "q", "image_url": IMAGE, "spatial_refs": [[0.5]]}, "spatial_refs[0]"),
    ("/v1/query", {"question": "q", "image_url": IMAGE, "spatial_refs": [[0.1, 0.2, 0.3]]}, "spatial_refs[0]"),
    ("/v1/query", {"question": "q", "image_url": IMAGE, "spatial_refs": [[0.1, 0.2], [1.5, 0.2]]}, "spatial_refs[1]"),
    ("/v1/query", {"question": "q", "image_url": IMAGE, "spatial_refs": [[0.6, 0.2, 0.3, 0.9]]}, "x_min <= x_max"),
    ("/v1/query", {"question": "q", "image_url": IMAGE, "spatial_refs": [[0.5, 0.5]] * (MAX_SPATIAL_REFS + 1)}, "spatial_refs"),
    ("/v1/point", {"image_url": IMAGE, "object": "x", "spatial_refs": [[0.5, 0.5]]}, "spatial_refs"),
])
def test_semantically_invalid_is_422(client, path, body, message_part):
    assert_error(post(client, path, body), 422, "invalid_value", message_part)


# ---------------------------------------------------------------- auth (401)
@pytest.fixture
def keyed_client(config, broker):
    return falcon.testing.TestClient(create_app(dataclasses.replace(config, api_key=API_KEY), broker))


@pytest.mark.parametrize("path", ["/v1/caption", "/v1/query", "/v1/detect", "/v1/point", "/v1/unknown"])
@pytest.mark.parametrize("key", [None, "", "wrong", API_KEY + "x", API_KEY.upper()])
def test_missing_or_wrong_key_is_401(keyed_client, path, key):
    headers = {"X-Moondream-Auth": key} if key is not None else {}
    assert_error(post(keyed_client, path, {"image_url": IMAGE}, headers), 401, "unauthorized")


def test_auth_comes_before_validation(keyed_client):
    result = keyed_client.simulate_post("/v1/caption", body=b"{", headers={"Content-Type": "text/plain"})
    assert_error(result, 401)


def test_right_key_gets_through(keyed_client):
    # Through auth to validation: the bad length proves the request was read.
    result = post(keyed_client, "/v1/caption", {"image_url": IMAGE, "length": "huge"}, {"X-Moondream-Auth": API_KEY})
    assert_error(result, 422)


def test_page_and_liveness_need_no_key(keyed_client):
    assert keyed_client.simulate_get("/health/live").status_code == 200
    page = keyed_client.simulate_get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert keyed_client.simulate_get("/static/app.js").status_code == 200


# ---------------------------------------------------------------- routing, ids, bugs
def test_unknown_route_and_method_are_json(client):
    assert_error(client.simulate_get("/v1/nope"), 404, "not_found")
    result = client.simulate_get("/v1/caption")
    assert_error(result, 405, "method_not_allowed")
    assert "POST" in result.headers["allow"]


def test_request_id_is_echoed_when_sane(client):
    result = post(client, "/v1/caption", {"image_url": IMAGE, "length": "huge"}, {"X-Request-ID": "trace-42.a:b"})
    assert result.headers["x-request-id"] == "trace-42.a:b"
    assert result.json["request_id"] == "trace-42.a:b"


@pytest.mark.parametrize("given", ["has space", "x" * 129, "semi;colon", "new\u00e9line"])
def test_unsafe_request_id_is_replaced(client, given):
    result = post(client, "/v1/caption", {"image_url": IMAGE, "length": "huge"}, {"X-Request-ID": given})
    rid = result.headers["x-request-id"]
    assert rid != given and len(rid) == 32 and int(rid, 16) >= 0
    assert result.json["request_id"] == rid


def test_model_field_names_the_served_model_or_is_404(client):
    # The official client sends "model": the base model's name and its aliases pass on to validation...
    for name in ("moondream2", "moondream3-preview", "moondream2/ft-alpha@100"):
        result = post(client, "/v1/caption", {"image_url": IMAGE, "length": "huge", "model": name})
        assert_error(result, 422, message_part="length")
    # ...anything else is a 404 that says what is served
    result = post(client, "/v1/caption", {"image_url": IMAGE, "model": "moondream-2"})
    assert_error(result, 404, "model_not_found", message_part="'moondream2'")


def test_a_bug_is_a_logged_json_500(config, caplog):
    app = create_app(config, ExplodingBrokerStandIn())
    with caplog.at_level(logging.ERROR, logger="frontend"):
        result = post(falcon.testing.TestClient(app), "/v1/caption", {"image_url": IMAGE})
    assert_error(result, 500, "internal_error")
    assert "injected fault" not in result.text  # no internals leak to the client
    assert any("injected fault" in (r.exc_text or str(r.exc_info)) for r in caplog.records)


# ---------------------------------------------------------------- images a preprocess worker refuses
# These need the real broker and workers (the `stack` fixture): the front end
# passes the bytes on undecoded, and the worker's verdict must come back as
# the right status.
def encoded(image: Image.Image, fmt: str, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def live_client(stack):
    from broker_client.client import BrokerClient
    from tests.frontend_helpers import warm_up

    warm_up(stack)
    broker = BrokerClient(stack.config)
    yield falcon.testing.TestClient(create_app(stack.config, broker))
    broker.close()


@pytest.mark.parametrize("data, mime, status", [
    (b"hello, this is not an image", "image/png", 400),
    (encoded(Image.new("RGB", (8, 8)), "TIFF"), "image/tiff", 415),
    (encoded(Image.new("RGB", (64, 64), "blue"), "PNG")[:80], "image/png", 422),  # truncated
    (encoded(Image.new("L", (20_000, 1)), "PNG"), "image/png", 413),             # wider than MAX_IMAGE_SIDE
], ids=["not-an-image", "tiff", "truncated-png", "too-wide"])
@pytest.mark.parametrize("stream", [False, True])
def test_image_refused_by_the_worker(live_client, data, mime, status, stream):
    result = post(live_client, "/v1/caption", {"image_url": data_url(data, mime), "stream": stream})
    # Even when streaming was asked for, an error before any text is a plain JSON error.
    assert_error(result, status)


def test_a_good_request_goes_through(live_client):
    image = data_url(encoded(Image.new("RGB", (40, 30), "green"), "JPEG"), "image/jpeg")
    result = post(live_client, "/v1/detect", {"image_url": image, "object": "square", "settings": {"max_objects": 2}})
    assert result.status_code == 200, result.text
    assert set(result.json) == {"request_id", "objects"} and len(result.json["objects"]) <= 2


def test_schemas_describe_the_routes():
    # The same Structs that validate must yield a JSON Schema (for an OpenAPI document).
    import msgspec

    from api.schemas import ROUTES

    _, components = msgspec.json.schema_components([schema for _, schema in ROUTES.values()])
    assert components["CaptionRequest"]["required"] == ["image_url"]
    assert components["QueryRequest"]["required"] == ["question"]
    assert set(components["DetectRequest"]["required"]) == {"image_url", "object"}
    assert components["CaptionRequest"]["properties"]["length"]["enum"] == ["short", "normal", "long"]


def test_defaults_left_out_respect_the_server_limits():
    from api.schemas import Settings
    from shared.protocol import SamplingSettings

    assert Settings().check(Config(max_tokens_limit=16, max_objects_limit=5)) == SamplingSettings(max_tokens=16, max_objects=5)
    assert Settings().check(Config()) == SamplingSettings()  # within the limits the engine's defaults apply
    assert Settings(max_tokens=8).check(Config(max_tokens_limit=16)).max_tokens == 8


def test_an_unknown_field_is_ignored_but_named_in_a_header_and_a_log_line(client, caplog):
    # `length` is checked after the fields are named: the 422 for it carries the header too.
    with caplog.at_level(logging.INFO, logger="frontend"):
        result = post(client, "/v1/caption", {"image_url": IMAGE, "lenght": "short", "length": "huge", "extra": 1})
    assert_error(result, 422, "invalid_value", "length must be one of")
    assert result.headers["x-ignored-fields"] == "lenght, extra"
    assert any("ignored unknown fields in /v1/caption: lenght, extra" in r.getMessage() for r in caplog.records)
