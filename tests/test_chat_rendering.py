"""How a conversation becomes one Moondream question, and how stop sequences cut
text (api/chat.py): pure functions, checked without a stack (the routes
themselves are checked end to end in tests/test_chat_e2e.py)."""
from __future__ import annotations

import random

import msgspec
import pytest

from api.chat import ChatError, StopCutter, render_conversation
from api.chat_schemas import ChatMessage

IMAGE = "data:image/png;base64,AAAA"


def messages(*raw: dict) -> list[ChatMessage]:
    return msgspec.convert(list(raw), list[ChatMessage])


def image_turn(text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                        {"type": "text", "text": text}]}


def test_one_user_message_is_the_question_unchanged():
    for content in ("  What is it?\n", [{"type": "text", "text": "  What is it?\n"}]):
        got = render_conversation(messages({"role": "user", "content": content}), 4000)
        assert (got.question, got.image_url) == ("  What is it?\n", None)
    got = render_conversation(messages(image_turn("What is it?")), 4000)
    assert (got.question, got.image_url) == ("What is it?", IMAGE)


def test_system_messages_and_earlier_turns_become_a_transcript():
    got = render_conversation(messages(
        {"role": "system", "content": "Answer briefly."},
        image_turn("What is it?"),
        {"role": "assistant", "content": "A cat."},
        {"role": "developer", "content": "Use British spelling."},
        {"role": "user", "content": "What colour is it?"}), 4000)
    assert got.image_url == IMAGE  # the image of an earlier turn is still the query's image
    assert got.question == ("Answer briefly.\n\nUse British spelling.\n\n"
                            "Conversation so far:\nUser: What is it?\nAssistant: A cat.\n\n"
                            "What colour is it?")


def test_a_turn_with_only_an_image_is_marked():
    got = render_conversation(messages(
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]},
        {"role": "assistant", "content": "Nice."}, {"role": "user", "content": "What is it?"}), 4000)
    assert "User: [image]\nAssistant: Nice." in got.question


@pytest.mark.parametrize("raw, code, words", [
    ([image_turn("a"), {"role": "assistant", "content": "b"}, image_turn("c")], "too_many_images",
     "one image per question"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}], "invalid_value",
     "last message must be a user message"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]}], "invalid_value",
     "no text"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]},
      {"role": "user", "content": "Hi"}], "invalid_value", "user messages only"),
    ([{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 30},
      {"role": "user", "content": "z"}], "invalid_value", "longer than 50 characters"),
])
def test_conversations_moondream_cannot_take_are_422s(raw, code, words):
    with pytest.raises(ChatError) as caught:
        render_conversation(messages(*raw), 50)
    assert caught.value.status == 422 and caught.value.code == code
    assert words in caught.value.message


def test_stop_cutter_holds_back_what_may_start_a_stop_sequence():
    cutter = StopCutter(["END", "\n\n"])
    sent = [cutter.feed(piece) for piece in ["Hello E", "N", "ough\n", "and E", "ND more"]]
    assert sent == ["Hello ", "", "ENough", "\nand ", ""] and cutter.stopped
    assert "".join(sent) == "Hello ENough\nand "
    assert cutter.feed("after") == "" and cutter.flush() == ""


def test_stop_cutter_without_a_hit_gives_everything_back():
    cutter = StopCutter(["xyz"])
    assert cutter.feed("abcx") + cutter.feed("y") + cutter.flush() == "abcxy" and not cutter.stopped
    assert StopCutter([]).cut("text") == "text"
    assert StopCutter(["b", "a"]).cut("cab") == "c"  # the earliest stop sequence wins


def _first_stop_reference(text: str, stops: list[str]) -> str:
    """The text before the stop sequence that ends first (the longest of those ending together)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(stop) for stop in stops if text[:end].endswith(stop)]
        if starts:
            return text[:min(starts)]
    return text


def test_stop_cutter_agrees_with_a_plain_search_on_every_split():
    rng = random.Random(7)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        cutter = StopCutter(stops)
        sent = "".join(cutter.feed(piece) for piece in pieces) + cutter.flush()
        assert sent == _first_stop_reference(text, stops), (stops, pieces)


def test_stop_cutter_holds_back_less_than_the_longest_stop():
    stop = "a" * 1023 + "b"  # every run of a's could be its start
    cutter = StopCutter([stop, "xyz"])
    sent = "".join(cutter.feed("a" * 7) for _ in range(500))
    assert len("a" * 3500) - len(sent) == 1023  # only what could still become the stop waits
    assert cutter.feed("b") == "" and cutter.stopped
