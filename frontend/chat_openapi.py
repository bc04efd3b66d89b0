"""The OpenAI-compatible routes in /openapi.json (frontend/openapi.py builds the
rest of the document and calls `paths` and `apply_limits`)."""
from __future__ import annotations

from api import chat_schemas as chat
from frontend import openapi_parts as base
from shared.config import Config

# The Structs that become components of the document.
SCHEMAS = [chat.ChatRequest, chat.ChatCompletion, chat.ChatCompletionChunk,
           chat.OpenAIError, chat.ModelList, chat.ModelCard]


def apply_limits(components: dict, config: Config) -> None:
    properties = components["ChatRequest"]["properties"]
    for field in ("max_completion_tokens", "max_tokens"):
        properties[field]["maximum"] = config.max_tokens_limit


def _errors(statuses) -> dict:
    return {str(status): base._response(base.ERRORS[status], base._json("OpenAIError")) for status in statuses}


def _chunk_stream() -> dict:
    """Each event's data: a ChatCompletionChunk, an error, or the closing [DONE]."""
    return {"text/event-stream": base.streamed({
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"oneOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"oneOf": [base._ref("ChatCompletionChunk"), base._ref("OpenAIError")]}},
        ]}},
    }, "server-sent events")}


def paths(config: Config) -> dict:
    auth = [401] if config.api_key else []
    security = {"security": base.SECURITY} if config.api_key else {}
    statuses = [400, *auth, *([403] if config.allow_remote_images else []), 404, 413, 415, 422, 429, 500, 503, 504]
    completions = {
        "operationId": "chat_completions",
        "summary": "OpenAI's chat completions: the conversation becomes one Moondream query.",
        "description": ("One user message with at most one image is exactly the query /v1/query runs. System "
                        "messages and earlier turns are written into the question as text (Moondream 2 was not "
                        "trained for multi-turn chat); more than one image is a 422. With \"stream\": true the "
                        "answer is chat.completion.chunk events, a usage chunk when stream_options.include_usage, "
                        "then [DONE]. Errors have OpenAI's shape."),
        "tags": ["openai"],
        "requestBody": {"required": True, "content": base._json("ChatRequest")},
        "responses": {"200": base._response("The completion.", {**base._json("ChatCompletion"), **_chunk_stream()}),
                      **_errors(statuses)},
        **security,
    }
    model_id = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"},
                "description": "MODEL_NAME or <model name>/<variant id>."}
    result = {
        chat.CHAT_PATH: {"post": completions},
        chat.MODELS_PATH: {"get": {
            "operationId": "list_models", "summary": "The base model and each available fine-tuned variant.",
            "tags": ["openai"], **security,
            "responses": {"200": base._response("OpenAI's model list.", base._json("ModelList")), **_errors(auth)}}},
        chat.MODELS_PATH + "/{model_id}": {"get": {
            "operationId": "retrieve_model", "summary": "One served model.", "tags": ["openai"], **security,
            "parameters": [model_id],
            "responses": {"200": base._response("The model.", base._json("ModelCard")), **_errors([*auth, 404])}}},
    }
    for path, why in chat.MISSING_SKILLS.items():
        skill = path.rsplit("/", 1)[-1]
        result[path] = {"post": {
            "operationId": skill, "summary": f"Not available: {why}.", "tags": ["skills"], **security,
            "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {str(chat.MISSING_SKILL_STATUS): base._response(base.ERRORS[chat.MISSING_SKILL_STATUS],
                                                                         base._json("ErrorBody")),
                          **base._error_responses(auth)}}}
    return result
