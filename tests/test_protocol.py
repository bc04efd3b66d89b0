"""The wire protocol: every message survives encode/decode; garbage is refused cleanly."""
import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import protocol
from shared.protocol import CaptionParams, QueryParams, SamplingSettings
from shared.protocol import (
    Cancel, Chunk, Error, Generate, Heartbeat, Leaving, PreprocessJob, Preprocessed, Ready, Refused, Result,
    Status, StatusQuery, Submit,
)

pytestmark = pytest.mark.timeout(60)

EXAMPLES = [
    Submit("r1", "query", QueryParams(question="what?", reasoning=True, spatial_refs=[[0.1, 0.2]]),
           SamplingSettings(temperature=0.5, top_p=0.9, max_tokens=16), stream=True, has_image=True, deadline=123.5),
    Cancel("r1"),
    StatusQuery("s1"),
    Status("s1", 2, 1, True, {"name": "m", "test_model": True}, queued=3, in_flight=4, broker_id="abc"),
    Ready(kind=protocol.GPU, worker_id="gpu-1", capacity=32, model={"name": "m"}, deployment="d"),
    Refused(reason="another deployment"),
    Leaving(worker_id="gpu-1"),
    Heartbeat(worker_id="w", free=3),
    Heartbeat(),
    PreprocessJob("r1", deadline=1.0),
    Preprocessed("r1", tiling=(1, 1), image_key="k", size_wh=(96, 64), preprocess_ms=1.5),
    Generate("r1", "caption", CaptionParams(length="short"), SamplingSettings(), has_image=True, tiling=(1, 1), image_key="k"),
    Chunk("r1", "héllo 世界\n"),
    Result("r1", {"objects": [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}]}, None, {"output_tokens": 3}),
    Error("r1", 503, "worker_died", "gone"),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    decoded, blob = protocol.decode(protocol.encode(msg))
    assert decoded == msg and blob is None


def test_blob_travels_as_a_separate_raw_frame_over_zmq():
    crops = np.arange(2 * 378 * 378 * 3, dtype=np.uint64).astype(np.uint8).reshape(2, 378, 378, 3)
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://protocol-test")
    b.connect("inproc://protocol-test")
    try:
        msg = Preprocessed("r", tiling=(1, 1), image_key="k", size_wh=(10, 10))
        frames = protocol.encode(msg, memoryview(crops).cast("B"))
        assert len(frames) == 2
        a.send_multipart(frames, copy=False)
        decoded, blob = protocol.decode(b.recv_multipart(copy=False))
        assert decoded == msg
        assert np.array_equal(np.frombuffer(blob, dtype=np.uint8).reshape(2, 378, 378, 3), crops)
    finally:
        a.close(linger=0)
        b.close(linger=0)


@pytest.mark.parametrize("frames", [
    [], [b""], [b"\xc1"], [b"not msgpack at all"], [b"a", b"b", b"c"],
    [msgspec.msgpack.encode({"type": "Nope", "request_id": "x"})],
    [msgspec.msgpack.encode({"type": "Cancel"})],  # missing field
    [msgspec.msgpack.encode({"type": "Error", "request_id": "x", "status": "bad", "code": "c", "message": "m"})],
])
def test_garbage_raises_decode_error(frames):
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        protocol.decode(frames)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_decode_errors(data):
    try:
        protocol.decode([data])
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass


@settings(max_examples=100, deadline=None)
@given(rid=st.text(min_size=1, max_size=40), question=st.text(max_size=200),
       temperature=st.floats(0, 2, allow_nan=False), stream=st.booleans())
def test_submit_round_trips_any_text(rid, question, temperature, stream):
    msg = Submit(rid, "query", QueryParams(question=question), SamplingSettings(temperature=temperature), stream=stream)
    assert protocol.decode(protocol.encode(msg))[0] == msg
