"""OpenAI's chat protocol as Moondream's query skill: a conversation -> one question
(`render_conversation`), the request's sampling -> query settings, and `stop` strings
cut out of the answer (`StopCutter`).  No HTTP here: frontend/chat.py serves it.

What a conversation means to Moondream 2 (docs/chat.md says more): Moondream 2
answers one question about at most one image; it was not trained on multi-turn
chat.  System messages and earlier turns are written into the question as text;
more than one image is a 422."""
from __future__ import annotations

import dataclasses
from typing import Optional

from api import schemas
from api.chat_schemas import ChatMessage, ChatRequest, ImagePart, TextPart
from api.errors import ApiError
from shared.config import Config
from shared.protocol import SamplingSettings


class ChatError(ApiError):
    """An ApiError that names the request field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, code: str, message: str, param: Optional[str] = None):
        super().__init__(status, code, message)
        self.param = param


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


def query_settings(request: ChatRequest, config: Config) -> SamplingSettings:
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
    return checked


def chat_seed(request: ChatRequest) -> Optional[int]:
    """The checked `seed` (Submit.seed: the GPU worker seeds the request's own sampler with it)."""
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise ChatError(422, "invalid_value", "seed must be between 0 and 2**63 - 1", "seed")
    return request.seed


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
