"""Every message that crosses a ZeroMQ socket in this system, in one place.

Wire format: a multipart ZeroMQ message whose first payload frame is a msgpack
encoding of one of the tagged structs below, optionally followed by one raw
binary frame (image bytes, or the resized image the crops are cut from) that is never pickled or copied into
the msgpack part.  ROUTER sockets add identity frames in front; the helpers
`encode`/`decode` only deal with the payload frames.

Flow of one request (request_id is the key everywhere):

    front end --Submit(+image bytes)--> broker --PreprocessJob(+image bytes)--> preprocess worker
    preprocess worker --Preprocessed(+resized frame)--> broker --Generate(+resized frame)--> GPU worker
    GPU worker --Chunk* then Result | Error--> broker --same--> the front end that asked

Workers announce themselves with Ready, then send Heartbeat; the broker sends
Heartbeat back (Paranoid Pirate: any traffic counts as a heartbeat).
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import msgspec

PROTOCOL_VERSION = 1

# Worker kinds, as announced in Ready.
PREPROCESS = "preprocess"
GPU = "gpu"


class Message(msgspec.Struct, tag=True, omit_defaults=True, array_like=False):
    """Base class; the class name is the msgpack tag."""


# ---------------------------------------------------------------- a request's parameters
# Each skill's parameters are a struct of their own, tagged with the skill's name on the wire
# ({"skill": "caption", "length": "short"}).  The edge (api/schemas.py) builds them from a checked
# request, with the server's limits; the broker carries them unchanged; the GPU worker reads them
# as attributes.  The ranges below hold whatever the limits: decoding refuses a message outside them.
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
SpatialRef = Annotated[list[Fraction], msgspec.Meta(min_length=2, max_length=4)]  # [x, y] | [x0, y0, x1, y1]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]


class CaptionParams(msgspec.Struct, tag="caption", tag_field="skill", frozen=True, forbid_unknown_fields=True):
    length: Literal["short", "normal", "long"] = "normal"


class QueryParams(msgspec.Struct, tag="query", tag_field="skill", frozen=True, forbid_unknown_fields=True,
                  omit_defaults=True):
    question: str
    reasoning: Optional[bool] = None  # None: the model's default (Moondream 3 reasons, Moondream 2 does not)
    spatial_refs: list[SpatialRef] = []
    total_cap: bool = False  # chat: max_tokens caps reasoning and answer together (docs/chat.md)


class DetectParams(msgspec.Struct, tag="detect", tag_field="skill", frozen=True, forbid_unknown_fields=True):
    object: str


class PointParams(msgspec.Struct, tag="point", tag_field="skill", frozen=True, forbid_unknown_fields=True):
    object: str


SkillParams = Union[CaptionParams, QueryParams, DetectParams, PointParams]
PARAMS_OF_SKILL: dict[str, type] = {"caption": CaptionParams, "query": QueryParams,
                                    "detect": DetectParams, "point": PointParams}


class SamplingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Sampling settings of one request.  A field left None takes the model's default
    (`filled`); `seed` and `variant` are fields of Submit, never settings."""

    temperature: Optional[Annotated[float, msgspec.Meta(ge=0)]] = None
    top_p: Optional[Fraction] = None  # 0: greedy
    max_tokens: Optional[AtLeastOne] = None
    max_objects: Optional[AtLeastOne] = None

    def filled(self, defaults: "SamplingSettings") -> "SamplingSettings":
        """These settings, with `defaults`' value for each one left None."""
        given = {name: getattr(self, name) for name in self.__struct_fields__}
        return SamplingSettings(**{name: getattr(defaults, name) if value is None else value
                                   for name, value in given.items()})


def check_params_match(skill: str, params) -> None:
    """A Submit's or Generate's params must be its skill's struct (raised on decode too)."""
    if type(params) is not PARAMS_OF_SKILL.get(skill):
        raise ValueError(f"skill {skill!r} carries {type(params).__name__}")


# ---------------------------------------------------------------- front end -> broker
class Submit(Message):
    """A validated API request.  The image (if any) travels as the next frame,
    still encoded (JPEG/PNG/...); decoding happens in a preprocess worker."""

    request_id: str
    skill: str  # "caption" | "query" | "detect" | "point"
    params: SkillParams  # the skill's own parameters, checked at the edge (api/schemas.py)
    settings: SamplingSettings = SamplingSettings()  # checked at the edge; a field left None = the model's default
    stream: bool = False
    has_image: bool = False
    deadline: float = 0.0  # absolute time.time(); 0 = none
    priority: int = 0  # INTERACTIVE, or BACKGROUND for batch lines: the broker queues those behind
    model: str = ""  # the served model's id (MOONDREAM_MODELS); "" = whichever GPU worker
    seed: Optional[int] = None  # the chat route's `seed`: the request's own sampler starts from it; None = random
    variant: Optional[str] = None  # fine-tuned variant id (checked by api/models.py); None = the base model

    def __post_init__(self):
        check_params_match(self.skill, self.params)


# The model's sampling defaults for a setting a request leaves out (Moondream 3 differs in
# top_p and max_objects: gpu_worker/programs.py).  Defined once: the edge caps them by its limits.
DEFAULT_MAX_TOKENS = 768
DEFAULT_MAX_OBJECTS = 50


# Submit.priority values: the broker's queues serve higher values first, in arrival order.
INTERACTIVE = 0
BACKGROUND = -1




class Cancel(Message):
    """Client went away or gave up: stop work on request_id (idempotent)."""

    request_id: str


class StatusQuery(Message):
    """Asks the broker for a Status reply (used by /health)."""

    request_id: str


# ---------------------------------------------------------------- broker -> front end
class Status(Message):
    request_id: str
    preprocess_workers: int
    gpu_workers: int
    gpu_ready: bool
    model: dict = {}  # from the GPU worker's Ready: id, name, revision, device, dtype, test_model
    queued: int = 0
    in_flight: int = 0
    broker_id: str = ""  # changes when the broker restarts: clients fail what they had in flight
    gpu_slots: int = 0  # sequences the GPU workers can hold, summed
    gpu_free_slots: int = 0  # of which free now (from their last heartbeats)
    gpu_stats: dict = {}  # the GPU workers' scheduler counters, summed
    worker_restarts: dict = {}  # kind -> workers lost (died or went silent) since the broker started
    variants: dict = {}  # GPU workers' variant ids, merged: {"loaded": [...], "available": [...]}
    deployment: str = ""  # the broker's config.deployment_id: a front end of another deployment stops using it
    background: int = 0  # of queued + in_flight, the BACKGROUND ones (batch lines)
    cannot_start: dict = {}  # kind -> the reason its last worker gave for not starting (CannotStart)
    models: list = []  # every served model's Ready.model, one per id (several models: MOONDREAM_MODELS)


# ---------------------------------------------------------------- workers <-> broker
class Ready(Message):
    """First message of a worker on (re)connect.  A GPU worker's `model` carries the id of the
    model it serves ("id"): the broker gives it only requests for that model."""

    kind: str  # PREPROCESS | GPU
    worker_id: str
    capacity: int = 1  # how many jobs it can hold at once
    model: dict = {}
    deployment: str = ""  # config.deployment_id: the broker refuses a worker of another deployment
    variants: dict = {}  # GPU worker: as in Heartbeat, so that /health lists them from the start


class Heartbeat(Message):
    worker_id: str = ""
    free: int = -1  # GPU worker: free capacity now; -1 = unknown / not a worker
    stats: dict = {}  # GPU worker: its scheduler's counters (running, waiting, image cache, steps)
    variants: dict = {}  # GPU worker: {"loaded": [ids], "available": [ids]} (fine-tuned variants)


class Refused(Message):
    """Broker -> worker: "you are not one of mine" (another deployment): the worker stops for good."""

    reason: str


class Leaving(Message):
    """Worker -> broker: stopping on purpose (its jobs go back to the queue at once)."""

    worker_id: str = ""


class CannotStart(Message):
    """Worker -> broker, before it exits 78: why it cannot serve (a model that cannot be fetched),
    so that /health can say so instead of "still loading".  Sent without registering first."""

    kind: str  # PREPROCESS | GPU
    reason: str
    deployment: str = ""  # as in Ready: a broker of another deployment ignores it


class RegisterAgain(Message):
    """Broker -> worker: "I do not know you" (the broker restarted): send Ready now."""


class PreprocessJob(Message):
    """Decode and tile; image bytes follow as the next frame."""

    request_id: str
    deadline: float = 0.0
    want_pixels: bool = False  # also ship the decoded RGB image (for MOONDREAM_ENGINE=transformers)


class Preprocessed(Message):
    """The resized frame follows: raw uint8, C order, the global crop (378, 378, 3) then the image
    resized for the tiling (shared/tiling_geometry.py, resized_shape), from which the GPU worker
    cuts the 1 + rows*cols crops itself (fewer bytes than the overlapping crops)."""

    request_id: str
    tiling: tuple[int, int]  # (rows, cols) of local crops: fixes the resized image's shape
    image_key: str  # sha256 of the decoded RGB pixels: the GPU worker's image-cache key
    size_wh: tuple[int, int]
    preprocess_ms: float = 0.0
    pixels_shape: tuple = ()  # (H, W, 3) when the decoded image follows, at the end of the same frame


class Generate(Message):
    """A request ready for the GPU; if has_image, the resized frame of Preprocessed follows."""

    request_id: str
    skill: str
    params: SkillParams  # Submit.params, unchanged
    settings: SamplingSettings = SamplingSettings()  # Submit.settings, unchanged
    stream: bool = False
    has_image: bool = False
    tiling: tuple[int, int] = (1, 1)
    image_key: str = ""
    deadline: float = 0.0
    pixels_shape: tuple = ()  # (H, W, 3) when the decoded image ends the frame (MOONDREAM_ENGINE=transformers)
    priority: int = INTERACTIVE  # Submit.priority: the GPU worker starts interactive requests first
    seed: Optional[int] = None  # Submit.seed
    variant: Optional[str] = None  # Submit.variant

    def __post_init__(self):
        check_params_match(self.skill, self.params)


# ---------------------------------------------------------------- replies (GPU/preprocess -> broker -> front end)
class Chunk(Message):
    """A piece of streamed text."""

    request_id: str
    text: str


class Result(Message):
    """The final answer.  output is the API body without request_id/metrics
    ({"caption": ..} / {"answer": .., "reasoning": ..} / {"objects": [..]} / {"points": [..]})."""

    request_id: str
    output: dict
    finish_reason: Optional[str] = None  # "stop" | "length" for text skills
    metrics: dict = {}  # input_tokens, output_tokens, prefill_time_ms, decode_time_ms, ttft_ms, ...


class Error(Message):
    """The request failed; status is the HTTP status the client should get."""

    request_id: str
    status: int
    code: str  # short machine-readable reason, e.g. "invalid_image", "worker_died", "timeout"
    message: str


AnyMessage = Union[
    Submit, Cancel, StatusQuery, Status, Ready, Heartbeat, RegisterAgain, Refused, Leaving, CannotStart, PreprocessJob,
    Preprocessed, Generate, Chunk, Result, Error,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


def encode(msg: Message, blob: Optional[bytes | memoryview] = None) -> list:
    """Payload frames for a message: [msgpack] or [msgpack, blob]."""
    frames = [_encoder.encode(msg)]
    if blob is not None:
        frames.append(blob)
    return frames


def request_id_of(frame) -> Optional[str]:
    """The request_id of a message that did not decode as its type (a value out of range), so that
    its sender can still be answered; None when there is none to read."""
    try:
        fields = msgspec.msgpack.decode(frame.bytes if hasattr(frame, "bytes") else frame)
    except (msgspec.DecodeError, RecursionError):
        return None
    rid = fields.get("request_id") if isinstance(fields, dict) else None
    return rid if isinstance(rid, str) else None


def decode(frames: list) -> tuple[AnyMessage, Optional[bytes | memoryview]]:
    """Inverse of encode.  Raises msgspec.DecodeError on garbage."""
    if not frames or len(frames) > 2:
        raise msgspec.DecodeError(f"expected 1 or 2 payload frames, got {len(frames)}")
    head = frames[0]
    msg = _decoder.decode(head.bytes if hasattr(head, "bytes") else head)
    blob = None
    if len(frames) == 2:
        b = frames[1]
        blob = b.buffer if hasattr(b, "buffer") else b
    return msg, blob
