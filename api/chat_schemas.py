"""The OpenAI-compatible routes' bodies: requests (decoded and validated) and
answers (written down for /openapi.json), as msgspec Structs.

Validation has the same two steps as the /v1 skill routes (api/schemas.py):
a wrong shape is a 400 from msgspec, values that make no sense a 422 from
`ChatRequest.check`.  OpenAI fields that Moondream cannot honour (tools, n > 1,
logprobs, response formats, audio, ...) are declared here only so that each can
be refused with a 400 that names it: never silently ignored.  Other unknown
fields are ignored, as on every route.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import msgspec
from msgspec import UNSET, Meta, UnsetType

from api.schemas import Model, Variant

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

# Skills the official clients know that Moondream 2 lacks: path -> why it is refused.
MISSING_SKILLS = {
    "/v1/segment": "segmentation (segment) needs Moondream 3; this server runs Moondream 2",
}
# 501 Not Implemented: the server lacks the functionality, permanently (RFC 9110 makes
# it cacheable by default); no Retry-After.  docs/chat.md says why not a 4xx.
MISSING_SKILL_STATUS = 501

# OpenAI allows up to 4 stop sequences; each is bounded too (docs/chat.md), so that one
# request cannot make the front end's matching (api/chat.py StopCutter) long.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1024


class UnsupportedField(ValueError):
    """A field we cannot honour (HTTP 400); `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------- requests
class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImageUrl(msgspec.Struct):
    url: Annotated[str, Meta(description="A base64 data URL (data:image/jpeg;base64,...); http(s) URLs only "
                                         "where the server enables ALLOW_REMOTE_IMAGES.")]
    detail: Annotated[Optional[str], Meta(description="Accepted and ignored: Moondream always sees the image "
                                                      "the same way (a global crop and local tiles).")] = None


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: ImageUrl


ContentPart = Union[TextPart, ImagePart]


class ChatMessage(msgspec.Struct):
    role: Annotated[Literal["system", "developer", "user", "assistant"],
                    Meta(description="Tool and function messages are not supported (no tool calling).")]
    content: Annotated[Union[str, list[ContentPart], None],
                       Meta(description="Text, or a list of text and image_url parts (images in user messages only).")] = None
    name: Optional[str] = None  # accepted, not used
    tool_calls: Annotated[Any, Meta(description="Not supported: a 400.")] = None
    function_call: Annotated[Any, Meta(description="Not supported: a 400.")] = None


class StreamOptions(msgspec.Struct):
    include_usage: Annotated[bool, Meta(description="Send a last chunk with `usage` and empty `choices`.")] = False


StopString = Annotated[str, Meta(max_length=MAX_STOP_CHARS)]
Stop = Union[StopString, Annotated[list[StopString], Meta(max_length=MAX_STOP_SEQUENCES)], None]

NOT_SUPPORTED = "Not supported by Moondream 2: any value but the neutral one is a 400 naming the field."


class ChatRequest(msgspec.Struct):
    """POST /v1/chat/completions"""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    model: Model = None
    temperature: Annotated[Optional[float], Meta(description="Sampling temperature, >= 0; 0 is greedy. Default 0.5.",
                                                 extra_json_schema={"minimum": 0, "maximum": 2**63 - 1})] = None
    top_p: Annotated[Optional[float], Meta(description="Nucleus sampling mass in (0, 1]; 0 is greedy. Default 0.3.",
                                           extra_json_schema={"minimum": 0, "maximum": 1})] = None
    max_completion_tokens: Annotated[Optional[int], Meta(description="Most tokens to generate, 1..MAX_TOKENS_LIMIT.",
                                                         extra_json_schema={"minimum": 1})] = None
    max_tokens: Annotated[Optional[int], Meta(description="The older name of max_completion_tokens.",
                                              extra_json_schema={"minimum": 1})] = None
    stream: Annotated[Optional[bool], Meta(description="Answer with chat.completion.chunk server-sent events.")] = False
    stream_options: Optional[StreamOptions] = None
    stop: Annotated[Stop, Meta(description="Up to 4 strings of at most 1,024 characters each; the answer ends before the first one.")] = None
    seed: Annotated[Optional[int], Meta(description="Sampling seed: the same seed, settings and input give the same answer.",
                                        extra_json_schema={"minimum": 0, "maximum": 2**63 - 1})] = None
    reasoning: Annotated[Optional[bool], Meta(description="Moondream's grounded reasoning before the answer "
                                                          "(the OpenAI SDK sends it through extra_body).")] = None
    variant: Variant = None
    user: Optional[str] = None  # an end-user id for the caller's own tracking: accepted, not used

    # Refused with a 400 (see UNSUPPORTED below) unless they hold their neutral value.
    n: Annotated[Optional[int], Meta(description="Only 1.")] = None
    tools: Annotated[Any, Meta(description=NOT_SUPPORTED)] = None
    tool_choice: Annotated[Any, Meta(description=NOT_SUPPORTED)] = None
    functions: Annotated[Any, Meta(description=NOT_SUPPORTED)] = None
    function_call: Annotated[Any, Meta(description=NOT_SUPPORTED)] = None
    logprobs: Annotated[Optional[bool], Meta(description="Only false.")] = None
    top_logprobs: Annotated[Any, Meta(description=NOT_SUPPORTED)] = None
    logit_bias: Annotated[Any, Meta(description=NOT_SUPPORTED)] = None
    response_format: Annotated[Any, Meta(description='Only {"type": "text"}.')] = None
    audio: Annotated[Any, Meta(description=NOT_SUPPORTED)] = None
    modalities: Annotated[Any, Meta(description='Only ["text"].')] = None
    prediction: Annotated[Any, Meta(description=NOT_SUPPORTED)] = None
    presence_penalty: Annotated[Any, Meta(description="Only 0.")] = None
    frequency_penalty: Annotated[Any, Meta(description="Only 0.")] = None
    reasoning_effort: Annotated[Any, Meta(description='Not supported: use "reasoning": true.')] = None
    web_search_options: Annotated[Any, Meta(description=NOT_SUPPORTED)] = None

    def refuse_unsupported(self) -> None:
        for field, neutral in UNSUPPORTED.items():
            value = getattr(self, field)
            if value is not None and not neutral(value):
                raise UnsupportedField(field, f"{field} is not supported by this server (Moondream 2): "
                                              f"{UNSUPPORTED_WHY.get(field, 'leave it out')}")
        for i, message in enumerate(self.messages):
            for field in ("tool_calls", "function_call"):
                if getattr(message, field) not in (None, []):
                    raise UnsupportedField(f"messages[{i}].{field}",
                                           f"messages[{i}].{field} is not supported: this server has no tool calling")


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


# field -> which value means "not used" (accepted); anything else is a 400.
UNSUPPORTED = {
    "n": lambda v: v == 1,
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "logprobs": lambda v: v is False,
    "top_logprobs": _is_zero,
    "logit_bias": lambda v: v == {},
    "response_format": lambda v: v == {"type": "text"},
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
    "presence_penalty": _is_zero,
    "frequency_penalty": _is_zero,
    "reasoning_effort": lambda v: False,
    "web_search_options": lambda v: False,
}
UNSUPPORTED_WHY = {
    "n": "it gives one choice per request (n = 1)",
    "tools": "it has no tool calling",
    "tool_choice": "it has no tool calling",
    "functions": "it has no function calling",
    "function_call": "it has no function calling",
    "logprobs": "it does not return log probabilities",
    "top_logprobs": "it does not return log probabilities",
    "response_format": "it answers in plain text only",
    "audio": "it neither hears nor speaks",
    "modalities": "it answers in text only",
    "reasoning_effort": 'ask for Moondream\'s grounded reasoning with "reasoning": true',
}


# ---------------------------------------------------------------- answers (documentation only)
class Grounding(msgspec.Struct):
    """Points the reasoning text refers to, for characters start_idx..end_idx of it."""

    start_idx: int
    end_idx: int
    points: list[list[float]]


class ReasoningDetails(msgspec.Struct):
    grounding: list[Grounding]


class AssistantMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str
    reasoning: Union[str, UnsetType] = UNSET  # the reasoning trace, when the request asked for it
    reasoning_details: Union[ReasoningDetails, UnsetType] = UNSET


FinishReason = Literal["stop", "length"]


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: Annotated[str, Meta(description="What answered: MODEL_NAME or <model name>/<variant id>.")]
    choices: list[Choice]
    usage: Usage


class Delta(msgspec.Struct):
    role: Union[Literal["assistant"], UnsetType] = UNSET
    content: Union[str, UnsetType] = UNSET
    reasoning: Union[str, UnsetType] = UNSET  # on the last chunk (the trace is not streamed)
    reasoning_details: Union[ReasoningDetails, UnsetType] = UNSET


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: Optional[FinishReason] = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Union[Usage, None, UnsetType] = UNSET  # null on every chunk but the last with include_usage


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class OpenAIError(msgspec.Struct):
    """Every error of the OpenAI-compatible routes, in OpenAI's shape."""

    error: OpenAIErrorDetail
    request_id: Optional[str] = None


class ModelCard(msgspec.Struct):
    id: Annotated[str, Meta(description="MODEL_NAME, or <model name>/<variant id> for a fine-tuned variant.")]
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[ModelCard]
