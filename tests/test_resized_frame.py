"""The frame between the preprocess worker and the GPU worker carries the global crop and the one
resized image; the GPU worker cuts the local crops itself.  What it cuts must be tile_image's
crops bit for bit (the conformance crop hashes), and a frame of the wrong size must be a clean
400 from the real GPU worker process (and a 500 from the broker when a preprocess worker sends
it), never a crash."""
from __future__ import annotations

import hashlib
import io
import json
import time
import uuid

import numpy as np
import pytest
import zmq
from PIL import Image

from preprocess_worker.worker import preprocess
from shared import protocol
from shared.image_tiling import (
    CROP_BYTES, resize_for_tiling, resized_frame, resized_frame_size, select_tiling, split_resized_frame, tile_image,
)
from shared.protocol import CaptionParams, Error, Generate, Heartbeat, PreprocessJob, Preprocessed, Ready, Result, SamplingSettings, Submit
from tests.stack import REPO, ProcessGroup, free_port, stack_env
from tests.test_broker import PHOTO, services  # noqa: F401  (services is a fixture)

pytestmark = pytest.mark.timeout(90)

CONFORMANCE = REPO / "tests/conformance"
LIMITS = dict(max_pixels=50_000_000, max_side=16384)


def conformance_images():
    for expected_path in sorted(CONFORMANCE.glob("*/expected.json")):
        for name, exp in json.loads(expected_path.read_text())["images"].items():
            yield pytest.param(expected_path.parent / "images" / name, exp, id=f"{expected_path.parent.name}-{name}")


@pytest.mark.parametrize("path,exp", list(conformance_images()))
def test_crops_cut_from_the_frame_match_the_conformance_hashes(path, exp):
    with Image.open(path) as im:
        resized = resize_for_tiling(im.convert("RGB"))
    frame = resized_frame(resized)
    crops, pixels = split_resized_frame(frame, resized.tiling)
    assert pixels is None and list(resized.tiling) == exp["tiling_rows_cols"]
    assert hashlib.sha256(crops.tobytes()).hexdigest() == exp["crops_uint8_sha256"]
    assert len(frame) <= crops.nbytes  # never more than the crops; less as soon as there are two local crops


def random_png(width: int, height: int, seed: int) -> tuple[bytes, Image.Image]:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue(), image


EDGE_SIZES = {  # (width, height)
    "one pixel": (1, 1),
    "tiny": (7, 5),
    "one crop exactly": (378, 378),
    "largest 1x1 tiling": (378, 2 * 56 + 266),
    "smallest 2-crop tiling": (2 * 56 + 267, 2 * 56 + 267),
    "max tiling 3x4": (1176, 910),
    "max tiling, big": (4000, 3000),
    "very wide": (4000, 40),
    "very tall": (30, 3000),
    "wide strip of crops": (3000, 500),
    "odd sizes": (1001, 777),
}


@pytest.mark.parametrize("size", EDGE_SIZES.values(), ids=EDGE_SIZES.keys())
def test_gpu_side_crops_equal_tile_image_for_edge_sizes(size):
    data, image = random_png(*size, seed=size[0] * 7919 + size[1])
    done = preprocess(data, **LIMITS, want_pixels=True)  # the preprocess worker's own function
    frame = resized_frame(done.resized, done.pixels)
    crops, pixels = split_resized_frame(frame, done.resized.tiling, tuple(done.pixels.shape))
    expected = tile_image(image)
    assert done.resized.tiling == expected.tiling == select_tiling(size[1], size[0])
    assert crops.dtype == np.uint8 and crops.flags.writeable and crops.flags.c_contiguous
    assert np.array_equal(crops, expected.crops)
    assert np.array_equal(pixels, np.asarray(image))
    assert len(frame) == resized_frame_size(expected.tiling, pixels.shape)


def test_the_frame_is_smaller_than_the_crops_for_the_benchmark_image():
    rows, cols = select_tiling(960, 1280)
    frame_bytes = resized_frame_size((rows, cols))
    crops_bytes = (1 + rows * cols) * CROP_BYTES
    assert (rows, cols) == (3, 3) and frame_bytes == CROP_BYTES + 910 * 910 * 3
    assert frame_bytes < 0.7 * crops_bytes  # 2.91 MB instead of 4.29 MB


@pytest.mark.parametrize("tiling,pixels_shape,size_change", [
    ((1, 1), (), -1),
    ((1, 1), (), +1),
    ((2, 2), (), -CROP_BYTES),
    ((0, 1), (), 0),
    ((4, 4), (), 0),  # 16 local crops: more than select_tiling ever gives
    ((-1, -2), (), 0),
    ((1, 1), (4, 4), 0),  # not (H, W, 3)
    ((1, 1), ("4", 4, 3), 0),
    ((1, 1), (4, 4, 3), -1),
    ((1, 1), (), None),  # no frame at all
])
def test_a_frame_that_does_not_match_its_message_is_a_value_error(tiling, pixels_shape, size_change):
    good_size = CROP_BYTES + 378 * 378 * 3 + (48 if pixels_shape == (4, 4, 3) else 0)
    frame = None if size_change is None else bytes(good_size + size_change)
    with pytest.raises(ValueError):
        split_resized_frame(frame, tiling, pixels_shape)


class FakeBroker:
    """A ROUTER socket speaking the broker's side of the protocol to one real GPU worker, so
    the test can hand it frames the real broker would never forward (fault injection)."""

    def __init__(self, port: int):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.worker = b""

    def wait_for_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.sock.poll(200):
                identity, *frames = self.sock.recv_multipart()
                msg, _ = protocol.decode(frames)
                if isinstance(msg, Ready):
                    self.worker = identity
                    self.sock.send_multipart([identity, *protocol.encode(Heartbeat())])
                    return
        raise AssertionError("the GPU worker did not register")

    def ask(self, msg: Generate, frame) -> object:
        """Send one Generate; answer heartbeats until its final reply comes."""
        self.sock.send_multipart([self.worker, *protocol.encode(msg, frame)])
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if self.sock.poll(200):
                _, *frames = self.sock.recv_multipart()
                reply, _ = protocol.decode(frames)
                if isinstance(reply, Heartbeat):
                    self.sock.send_multipart([self.worker, *protocol.encode(Heartbeat())])
                elif isinstance(reply, (Result, Error)) and reply.request_id == msg.request_id:
                    return reply
        raise AssertionError(f"no answer to {msg.request_id}")

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture(scope="module")
def gpu_worker_and_fake_broker(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("frame")
    port = free_port()
    env = stack_env(run_dir, BROKER_BACKEND_ADDR=f"tcp://127.0.0.1:{port}")
    broker = FakeBroker(port)
    group = ProcessGroup(env, run_dir)
    group.start("gpu_worker")
    try:
        broker.wait_for_ready(timeout=60)
        yield broker
    finally:
        group.stop_all()
        broker.close()


def generate(tiling, pixels_shape=()) -> Generate:
    return Generate(request_id=uuid.uuid4().hex, skill="caption", params=CaptionParams(length="short"),
                    settings=SamplingSettings(temperature=0, max_tokens=4), has_image=True, tiling=tiling,
                    image_key=uuid.uuid4().hex, pixels_shape=pixels_shape)


def test_gpu_worker_answers_a_wrong_frame_with_400_and_keeps_serving(gpu_worker_and_fake_broker):
    broker = gpu_worker_and_fake_broker
    _, image = random_png(700, 500, seed=3)
    resized = resize_for_tiling(image)
    frame = resized_frame(resized)
    bad = [
        (generate(resized.tiling), frame[:-1]),  # one byte short
        (generate(resized.tiling), frame + b"\x00"),
        (generate((1, 1)), frame),  # a tiling the frame does not have
        (generate((5, 5)), bytes(resized_frame_size((3, 4)))),  # more local crops than allowed
        (generate(resized.tiling, pixels_shape=(2, 2)), frame),
        (generate(resized.tiling), None),  # no frame at all
    ]
    for msg, bad_frame in bad:
        reply = broker.ask(msg, bad_frame)
        assert isinstance(reply, Error) and (reply.status, reply.code) == (400, "invalid_image"), reply
    good = broker.ask(generate(resized.tiling), frame)
    assert isinstance(good, Result) and good.output["caption"], good


def test_broker_fails_a_request_whose_frame_does_not_match_its_tiling(services):  # noqa: F811
    """A preprocess worker that sends a frame of the wrong size (a fault injected by a protocol
    peer on a real socket) gets the request a 500, not a GPU worker a frame it cannot cut."""
    s = services()
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(s.config.broker_backend_addr)
    try:
        peer.send_multipart(protocol.encode(Ready(kind=protocol.PREPROCESS, worker_id="short-frames", capacity=1,
                                                  deployment=s.config.deployment_id)))
        s.wait_for(preprocess=1)
        stream = s.client.submit(Submit(request_id=uuid.uuid4().hex, skill="caption", params=CaptionParams(length="short"),
                                        settings=SamplingSettings(), has_image=True), PHOTO)
        end, job = time.monotonic() + 20, None
        while not isinstance(job, PreprocessJob):  # heartbeats from the broker come first
            assert time.monotonic() < end and peer.poll(5000), "no PreprocessJob came"
            job, _ = protocol.decode(peer.recv_multipart())
        reply = Preprocessed(request_id=job.request_id, tiling=(2, 2), image_key="k", size_wh=(773, 767))
        peer.send_multipart(protocol.encode(reply, bytes(resized_frame_size((2, 2)) - 1)))
        events = list(stream)
        assert [(type(e), e.status, e.code) for e in events] == [(Error, 500, "preprocess_failed")]
    finally:
        peer.close(linger=0)
