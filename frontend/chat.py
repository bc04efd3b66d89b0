"""OpenAI's chat protocol on top of Moondream's query skill, and the routes the
official clients call that Moondream 2 has no skill for.

Routes (added to the app by `register`):
    POST /v1/chat/completions   OpenAI's chat completions: one conversation -> one `query`
    GET  /v1/models             OpenAI's model list: the base model and its available variants
    GET  /v1/models/{id}        one of them
    POST /v1/segment            501: segmentation needs Moondream 3 (MISSING_SKILLS)

What a conversation means to Moondream 2 (docs/chat.md says more): Moondream 2
answers one question about at most one image; it was not trained on
multi-turn chat.  A conversation of one user message is exactly the `query`
that /v1/query would run with the same text, image and settings (the same
tokens).  System messages and earlier turns are written into the question as
text (`render_conversation`); more than one image is a 422.

Errors on these routes have OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``, so OpenAI SDKs raise their usual exceptions.
"""
from __future__ import annotations

import dataclasses
import re
import time
from itertools import chain
from typing import Optional

import falcon

from frontend import app as core
from frontend import models, remote_image, schemas
from frontend.chat_schemas import (CHAT_PATH, MISSING_SKILL_STATUS, MISSING_SKILLS, MODELS_PATH, ChatMessage,
                                   ChatRequest, ImagePart, TextPart, UnsupportedField)
from shared import protocol
from shared.config import Config

DONE_EVENT = b"data: [DONE]\n\n"  # OpenAI's end of a stream

# Pulls the field out of msgspec's messages ("... - at `$.messages[0].role`").
MSGSPEC_PATH = re.compile(r"at `\$\.([^`]+)`")


# ---------------------------------------------------------------- errors in OpenAI's shape
def speaks_openai(path: str) -> bool:
    return path == CHAT_PATH or path == MODELS_PATH or path.startswith(MODELS_PATH + "/")


def error_type(status: int) -> str:
    """OpenAI's error `type` for a status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


class ChatError(core.ApiError):
    """An ApiError that names the request field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, code: str, message: str, param: Optional[str] = None):
        super().__init__(status, code, message)
        self.param = param


def openai_error_body(status: int, code: str, message: str, param: Optional[str],
                      request_id: Optional[str]) -> dict:
    if param is None and status == 400:
        found = MSGSPEC_PATH.search(message)
        param = found.group(1) if found else None
    if param is None and code == "model_not_found":
        param = "model"
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code},
            "request_id": request_id}


def _reshape(req: falcon.Request, resp: falcon.Response, param: Optional[str]) -> None:
    """Turn the body the app's handlers wrote into OpenAI's shape, on OpenAI's routes."""
    if speaks_openai(req.path) and isinstance(resp.media, dict) and "error" in resp.media:
        error = resp.media["error"]
        resp.media = openai_error_body(resp.status_code, error["code"], error["message"], param,
                                       resp.media.get("request_id"))


def handle_http_error(req, resp, ex: falcon.HTTPError, params) -> None:
    core.handle_http_error(req, resp, ex, params)
    _reshape(req, resp, getattr(ex, "param", None))


def handle_unexpected(req, resp, ex: Exception, params) -> None:
    core.handle_unexpected(req, resp, ex, params)
    _reshape(req, resp, None)


# ---------------------------------------------------------------- a conversation -> one query
@dataclasses.dataclass
class Conversation:
    question: str
    image_url: Optional[str]


def _texts_and_images(message: ChatMessage) -> tuple[list[str], list[str]]:
    if message.content is None:
        return [], []
    if isinstance(message.content, str):
        return [message.content], []
    texts = [part.text for part in message.content if isinstance(part, TextPart)]
    images = [part.image_url.url for part in message.content if isinstance(part, ImagePart)]
    return texts, images


def render_conversation(messages: list[ChatMessage], max_chars: int) -> Conversation:
    """The question (and image) Moondream 2 is asked for a conversation.

    One user message and nothing else: its text, unchanged.  Otherwise the
    system and developer messages come first, then the earlier turns as a
    transcript ("User: ..." / "Assistant: ..."), then the last user message:

        <system text>

        Conversation so far:
        User: <text>
        Assistant: <text>

        <last user text>
    """
    images, instructions, turns = [], [], []
    for i, message in enumerate(messages):
        texts, message_images = _texts_and_images(message)
        if message_images and message.role != "user":
            raise ChatError(422, "invalid_value", f"messages[{i}] is a {message.role} message: "
                            "images are accepted in user messages only", f"messages[{i}].content")
        images += message_images
        text = "\n".join(texts)
        if message.role in ("system", "developer"):
            instructions.append(text)
        else:
            turns.append((message.role, text or ("[image]" if message_images else "")))
    if len(images) > 1:
        raise ChatError(422, "too_many_images", f"the conversation holds {len(images)} images: "
                        "Moondream 2 sees one image per question", "messages")
    if messages[-1].role != "user":
        raise ChatError(422, "invalid_value", "the last message must be a user message: "
                        "Moondream answers a question, it does not continue a reply", "messages")
    last = "\n".join(_texts_and_images(messages[-1])[0])
    if not last.strip():
        raise ChatError(422, "invalid_value", "the last user message has no text: ask a question",
                        f"messages[{len(messages) - 1}].content")
    history = turns[:-1]
    if not instructions and not history:
        question = last
    else:
        pieces = [text for text in instructions if text.strip()]
        if history:
            pieces.append("Conversation so far:\n" + "\n".join(
                f"{'User' if role == 'user' else 'Assistant'}: {text}" for role, text in history))
        question = "\n\n".join(pieces + [last])
    if len(question) > max_chars:
        raise ChatError(422, "invalid_value", f"the conversation, written out as one question, is longer than "
                        f"{max_chars} characters: send fewer or shorter earlier turns", "messages")
    return Conversation(question, images[0] if images else None)


def query_settings(request: ChatRequest, config: Config) -> dict:
    """The settings of the query, checked as on /v1 (same defaults, same limits)."""
    max_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    settings = schemas.Settings(temperature=request.temperature, top_p=request.top_p,
                                max_tokens=getattr(request, max_field))
    try:
        checked = settings.check(config)
    except schemas.InvalidValue as ex:
        message = str(ex).replace("settings.max_tokens", max_field).replace("settings.", "")
        param = next((name for name in ("temperature", "top_p", max_field) if message.startswith(name)), None)
        raise ChatError(422, "invalid_value", message, param) from None
    if request.seed is not None:
        if not 0 <= request.seed < 2**63:
            raise ChatError(422, "invalid_value", "seed must be between 0 and 2**63 - 1", "seed")
        checked["seed"] = request.seed  # the GPU worker seeds the request's own sampler with it
    return checked


def stop_sequences(request: ChatRequest) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if any(not stop for stop in stops):
        raise ChatError(422, "invalid_value", "stop sequences must not be empty", "stop")
    return stops


class StopCutter:
    """Ends text before the first stop sequence.  Fed streamed text piece by
    piece, it holds back the tail that could be the start of a stop sequence.

    Each stop is followed by a KMP automaton (its state: how much of the stop the
    text now ends with), so every character costs constant time whatever the stops'
    lengths, and the text held back is never longer than the longest stop."""

    def __init__(self, stops: list[str]):
        self._stops = [_StopMatcher(stop) for stop in stops]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that can be sent now."""
        if self.stopped:
            return ""
        base = len(self._pending)
        self._pending += text
        ends = [(m.first_end(text), m) for m in self._stops]
        hits = [(end, m) for end, m in ends if end >= 0]
        if hits:
            # the stop that ends first; of those ending together, the longest (it starts first)
            first = min(end for end, _ in hits)
            start = min(base + end + 1 - len(m.stop) for end, m in hits if end == first)
            self.stopped = True
            out, self._pending = self._pending[:start], ""
            return out
        hold = max((m.state for m in self._stops), default=0)
        out = self._pending[:len(self._pending) - hold]
        self._pending = self._pending[len(out):]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def cut(self, text: str) -> str:
        return self.feed(text) + self.flush()


class _StopMatcher:
    """One stop sequence's Knuth-Morris-Pratt automaton."""

    def __init__(self, stop: str):
        self.stop = stop
        self.state = 0  # the longest prefix of `stop` that the text seen so far ends with
        # fallback[k]: the longest proper prefix of stop[:k + 1] that is also its suffix
        self.fallback = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fallback[i] = k

    def first_end(self, text: str) -> int:
        """Feed `text`; the index of the character that first completes the stop, or -1."""
        stop, fallback, n = self.stop, self.fallback, len(self.stop)
        k, i = self.state, 0
        while i < len(text):
            if k == 0:  # nothing matched: jump to the stop's first character (str.find, in C)
                i = text.find(stop[0], i)
                if i < 0:
                    break
            elif k == n:  # matched before: go on from its longest border
                k = fallback[k - 1]
            char = text[i]
            while k and stop[k] != char:
                k = fallback[k - 1]
            if stop[k] == char:
                k += 1
            i += 1
            if k == n:
                self.state = k
                return i - 1
        self.state = k
        return -1


# ---------------------------------------------------------------- answers
@dataclasses.dataclass
class Completion:
    """What every body of one answer repeats, and how a Result becomes one."""

    id: str
    created: int
    model: str

    def usage(self, result: protocol.Result) -> dict:
        prompt, completion = result.metrics.get("input_tokens", 0), result.metrics.get("output_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def reasoning(result: protocol.Result) -> dict:
        reasoning = result.output.get("reasoning")
        if reasoning is None:
            return {}
        return {"reasoning": reasoning["text"], "reasoning_details": {"grounding": reasoning["grounding"]}}

    def body(self, result: protocol.Result, cutter: StopCutter) -> dict:
        content = cutter.cut(result.output["answer"])
        message = {"role": "assistant", "content": content, **self.reasoning(result)}
        finish = "stop" if cutter.stopped else (result.finish_reason or "stop")
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": self.usage(result)}

    def chunk(self, delta: dict, finish_reason: Optional[str] = None, with_usage: bool = False) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        if with_usage:
            body["usage"] = None  # OpenAI's convention: null until the usage chunk
        return core.sse(body)


class ChatStreamBody(core.EventStreamBody):
    """chat.completion.chunk events: the role, the text as it comes, a last chunk
    with finish_reason (and the reasoning trace), the usage chunk when asked
    for, then `data: [DONE]`.  A client that hangs up cancels the generation
    (EventStreamBody.close); so does a stop sequence when no usage is awaited."""

    def __init__(self, events, stream, request_id: str, completion: Completion, cutter: StopCutter,
                 include_usage: bool):
        super().__init__(events, stream, request_id)
        self._completion = completion
        self._cutter = cutter
        self._include_usage = include_usage
        self._started = False

    def render(self, event) -> bytes:
        c = self._completion
        out = b""
        if not self._started:
            self._started = True
            out += c.chunk({"role": "assistant", "content": ""}, with_usage=self._include_usage)
        if isinstance(event, protocol.Chunk):
            text = self._cutter.feed(event.text)
            if text:
                out += c.chunk({"content": text}, with_usage=self._include_usage)
            if self._cutter.stopped and not self._include_usage:
                self.close()  # nothing more to wait for: stop the generation and end here
                out += c.chunk({}, "stop") + DONE_EVENT
            return out
        if isinstance(event, protocol.Result):
            tail = self._cutter.flush()
            if tail:
                out += c.chunk({"content": tail}, with_usage=self._include_usage)
            finish = "stop" if self._cutter.stopped else (event.finish_reason or "stop")
            out += c.chunk(c.reasoning(event), finish, with_usage=self._include_usage)
            if self._include_usage:
                out += core.sse({"id": c.id, "object": "chat.completion.chunk", "created": c.created,
                                 "model": c.model, "choices": [], "usage": c.usage(event)})
            return out + DONE_EVENT
        return out + core.sse(openai_error_body(event.status, event.code, event.message, None, self._request_id))


# ---------------------------------------------------------------- resources
def served_models(client, names: models.ModelNames) -> list[str]:
    """The ids `model` may name: the base model, then each variant the GPU workers have."""
    status = client.status(timeout=1.0)
    variants = status.variants if status is not None else {}
    ids = set(variants.get("available", [])) | set(variants.get("loaded", []))
    return list(names.ids) + [names.model_id(v) for v in sorted(ids)]


class ChatResource:
    """POST /v1/chat/completions"""

    def __init__(self, config: Config, client):
        self._config = config
        self._client = client
        self._fetch_remote = remote_image.fetcher(config)  # None unless ALLOW_REMOTE_IMAGES
        self._names = models.ModelNames(config)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = core.parse_request(core.read_json_body(req, self._config.max_body_bytes), ChatRequest)
        try:
            request.refuse_unsupported()
        except UnsupportedField as ex:
            raise ChatError(400, "unsupported_parameter", str(ex), ex.param) from None
        try:
            variant = core.requested_variant(self._names, request)
        except core.ApiError as ex:
            if ex.code != "model_not_found":
                raise
            served = ", ".join(served_models(self._client, self._names))
            raise ChatError(404, "model_not_found", f"model {request.model[:100]!r} is not served here; "
                            f"served: {served}", "model") from None
        conversation = render_conversation(request.messages, self._config.max_text_chars)
        settings = query_settings(request, self._config)
        cutter = StopCutter(stop_sequences(request))
        if variant is not None:
            settings["variant"] = variant
        model_id = self._names.resolve(request.model)[0]  # checked by requested_variant
        model = self._names.model_id(variant, model_id)
        req.context.model_id = model  # for /metrics
        # The same params /v1/query sends for a question without spatial references.
        # total_cap: max_completion_tokens counts reasoning and answer together (docs/chat.md);
        # reasoning None: the model's default (Moondream 3 reasons, Moondream 2 does not)
        params = {"question": conversation.question, "reasoning": request.reasoning, "spatial_refs": [],
                  "total_cap": True}
        image_url = conversation.image_url
        image = core.decode_image_url(image_url, self._fetch_remote) if image_url is not None else None
        streaming = bool(request.stream)

        first, events, stream = core.start_request(self._client, self._config, req, "query", params,
                                                   settings, image, streaming, self._names.submit_model(model_id))
        completion = Completion(id=f"chatcmpl-{req.context.request_id}", created=int(time.time()), model=model)
        if not streaming:
            resp.media = completion.body(first, cutter)
            return
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        core.send_event_stream(resp, ChatStreamBody(chain([first], events), stream, req.context.request_id,
                                                    completion, cutter, include_usage))


class ModelsResource:
    """GET /v1/models and GET /v1/models/{model_id}: what `model` may name."""

    def __init__(self, config: Config, client):
        self._client = client
        self._names = models.ModelNames(config)
        self._created = int(time.time())

    def _served(self) -> list[str]:
        return served_models(self._client, self._names)

    def _card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self._created, "owned_by": "moondream-serving"}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": [self._card(model_id) for model_id in self._served()]}

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        served = self._served()
        if model_id not in served:
            raise ChatError(404, "model_not_found", f"model {model_id[:100]!r} is not served here; "
                            f"served: {', '.join(served)}", "model")
        resp.media = self._card(model_id)


class MissingSkillResource:
    """A skill of Moondream's API that Moondream 2 does not have."""

    def __init__(self, why: str):
        self._why = why

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise core.ApiError(MISSING_SKILL_STATUS, "not_supported_by_model",
                            f"{self._why}: retrying will not help")


def register(app: falcon.App, config: Config, client) -> None:
    app.add_route(CHAT_PATH, ChatResource(config, client))
    models_resource = ModelsResource(config, client)
    app.add_route(MODELS_PATH, models_resource)
    app.add_route(MODELS_PATH + "/{model_id:path}", models_resource, suffix="one")
    for path, why in MISSING_SKILLS.items():
        app.add_route(path, MissingSkillResource(why))
    # The same handlers, answering in OpenAI's shape on OpenAI's routes.
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(Exception, handle_unexpected)
