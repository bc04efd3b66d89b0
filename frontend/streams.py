"""From a checked request to its answer: submit to the broker, wait for the events,
and render them as a JSON body or as server-sent events."""
from __future__ import annotations

import time
import uuid
from typing import Iterator, Optional

import falcon
import msgspec

from api.errors import broker_error
from broker_client.waiting import wait_events
from shared import protocol
from shared.config import Config

# The metrics the API promises; Result.metrics may carry more (internal ones).
METRIC_KEYS = ("input_tokens", "output_tokens", "prefill_time_ms", "decode_time_ms", "ttft_ms")
TEXT_SKILLS = ("caption", "query")


def result_extras(result: protocol.Result) -> dict:
    """What a caption or query answer carries besides its text."""
    extras = {"metrics": {k: result.metrics[k] for k in METRIC_KEYS if k in result.metrics},
              "finish_reason": result.finish_reason}
    if result.output.get("reasoning") is not None:
        extras["reasoning"] = result.output["reasoning"]
    return extras


def result_body(request_id: str, skill: str, result: protocol.Result) -> dict:
    body = {"request_id": request_id, **result.output}
    if skill in TEXT_SKILLS:
        body.pop("reasoning", None)  # put back by result_extras unless it is None
        body.update(result_extras(result))
    return body


def sse(data: dict) -> bytes:
    # msgspec escapes newlines inside strings, so one event is one data line.
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


class EventStreamBody:
    """The WSGI body of a streamed reply: one SSE event per Chunk, then a final
    event for the Result or Error.

    close() is called by the server when the response ends, finished or not; if
    the request had not finished (client gone, write failed) it is cancelled so
    the GPU stops working for nobody.  A class rather than a generator because
    a generator closed before its first step never runs its `finally` block."""

    def __init__(self, events: Iterator, stream, request_id: str):
        self._events = events
        self._stream = stream
        self._request_id = request_id
        self._finished = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        if self._finished:
            raise StopIteration
        event = next(self._events)
        if not isinstance(event, protocol.Chunk):
            self._finished = True
            if isinstance(event, protocol.Error) and event.status == 499:  # the client went away: nobody to tell
                raise StopIteration
        return self.render(event)

    def render(self, event) -> bytes:
        """The bytes sent for one event (subclasses speak other dialects: frontend/chat.py)."""
        if isinstance(event, protocol.Chunk):
            return sse({"chunk": event.text, "completed": False})
        if isinstance(event, protocol.Result):
            return sse({"chunk": "", "completed": True, "request_id": self._request_id,
                        **result_extras(event)})
        return sse({"error": {"code": event.code, "message": event.message, "status": event.status},
                    "completed": True, "request_id": self._request_id})

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._stream.cancel()


def start_request(client, config: Config, req: falcon.Request, skill: str, params: protocol.SkillParams,
                  settings: protocol.SamplingSettings,
                  image: Optional[bytes], streaming: bool, model: str = "", *,
                  variant: Optional[str] = None, seed: Optional[int] = None) -> tuple:
    """Submit a validated request to the broker -> (first event, the events after it, its stream).

    Non-streaming: the first event is the final Result.  Streaming: it is the
    first event of any kind, awaited before committing to 200, so that an error
    that comes before any text (bad image, queue full) gets its real status:
    an Error raises its ApiError here."""
    deadline = time.time() + config.request_timeout
    submit = protocol.Submit(
        request_id=routing_id(req),
        skill=skill,
        params=params,
        settings=settings,
        stream=streaming,
        has_image=image is not None,
        deadline=deadline,
        model=model,  # which served model's GPU workers take it ("": the only one)
        variant=variant,
        seed=seed,
    )
    stream = client.submit(submit, image)
    events = wait_events(stream, deadline, req.env.get("waitress.client_disconnected"))
    try:
        first = next(event for event in events if streaming or not isinstance(event, protocol.Chunk))
    except BaseException:
        stream.cancel()  # a bug or shutdown: don't leave the work running
        raise
    if isinstance(first, protocol.Error):
        raise broker_error(first)
    return first, events, stream


def send_event_stream(resp: falcon.Response, body) -> None:
    resp.content_type = "text/event-stream"
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")  # tell reverse proxies not to buffer
    resp.stream = body


def routing_id(req: falcon.Request) -> str:
    """The id the broker routes replies by.  It must be unique, and a
    client-chosen X-Request-ID need not be, so that one gets a suffix; it
    still starts with the client's id, so logs can be matched up."""
    if req.context.client_request_id:
        return f"{req.context.request_id}.{uuid.uuid4().hex[:12]}"
    return req.context.request_id
