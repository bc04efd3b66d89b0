"""OpenAI's chat protocol on top of Moondream's query skill, and the routes the
official clients call that Moondream 2 has no skill for.

Routes (added to the app by `register`):
    POST /v1/chat/completions   OpenAI's chat completions: one conversation -> one `query`
    GET  /v1/models             OpenAI's model list: the base model and its available variants
    GET  /v1/models/{id}        one of them
    POST /v1/segment            501: segmentation needs Moondream 3 (MISSING_SKILLS)

A conversation of one user message is exactly the `query` that /v1/query would
run with the same text, image and settings (the same tokens); the translation
itself (render_conversation, StopCutter) is transport-free, in api/chat.py.

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

from api import models, remote_image
from api.chat import ChatError, StopCutter, chat_seed, query_settings, render_conversation, stop_sequences
from api.chat_schemas import CHAT_PATH, MISSING_SKILL_STATUS, MISSING_SKILLS, MODELS_PATH, ChatRequest, UnsupportedField
from api.errors import ApiError
from api.images import decode_image_url
from api.parsing import parse_request, requested_variant
from frontend import http_errors
from frontend.bodies import read_json_body
from frontend.streams import EventStreamBody, send_event_stream, sse, start_request
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
    http_errors.handle_http_error(req, resp, ex, params)
    _reshape(req, resp, getattr(ex, "param", None))


def handle_api_error(req, resp, ex: ApiError, params) -> None:
    http_errors.handle_http_error(req, resp, http_errors.as_http_error(ex), params)
    _reshape(req, resp, getattr(ex, "param", None))


def handle_unexpected(req, resp, ex: Exception, params) -> None:
    http_errors.handle_unexpected(req, resp, ex, params)
    _reshape(req, resp, None)


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
        return sse(body)


class ChatStreamBody(EventStreamBody):
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
                out += sse({"id": c.id, "object": "chat.completion.chunk", "created": c.created,
                                 "model": c.model, "choices": [], "usage": c.usage(event)})
            return out + DONE_EVENT
        return out + sse(openai_error_body(event.status, event.code, event.message, None, self._request_id))


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
        request = parse_request(read_json_body(req, self._config.max_body_bytes), ChatRequest)
        try:
            request.refuse_unsupported()
        except UnsupportedField as ex:
            raise ChatError(400, "unsupported_parameter", str(ex), ex.param) from None
        try:
            variant = requested_variant(self._names, request)
        except ApiError as ex:
            if ex.code != "model_not_found":
                raise
            served = ", ".join(served_models(self._client, self._names))
            raise ChatError(404, "model_not_found", f"model {request.model[:100]!r} is not served here; "
                            f"served: {served}", "model") from None
        conversation = render_conversation(request.messages, self._config.max_text_chars)
        settings, seed = query_settings(request, self._config), chat_seed(request)
        cutter = StopCutter(stop_sequences(request))
        model_id = self._names.resolve(request.model)[0]  # checked by requested_variant
        model = self._names.model_id(variant, model_id)
        req.context.model_id = model  # for /metrics
        # The same params /v1/query sends for a question without spatial references.
        # total_cap: max_completion_tokens counts reasoning and answer together (docs/chat.md);
        # reasoning None: the model's default (Moondream 3 reasons, Moondream 2 does not)
        params = protocol.QueryParams(question=conversation.question, reasoning=request.reasoning, total_cap=True)
        image_url = conversation.image_url
        image = decode_image_url(image_url, self._fetch_remote) if image_url is not None else None
        streaming = bool(request.stream)

        first, events, stream = start_request(self._client, self._config, req, "query", params,
                                              settings, image, streaming, self._names.submit_model(model_id),
                                              variant=variant, seed=seed)
        completion = Completion(id=f"chatcmpl-{req.context.request_id}", created=int(time.time()), model=model)
        if not streaming:
            resp.media = completion.body(first, cutter)
            return
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        send_event_stream(resp, ChatStreamBody(chain([first], events), stream, req.context.request_id,
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
        raise ApiError(MISSING_SKILL_STATUS, "not_supported_by_model",
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
    app.add_error_handler(ApiError, handle_api_error)
    app.add_error_handler(Exception, handle_unexpected)
