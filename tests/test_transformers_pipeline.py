"""MOONDREAM_ENGINE=transformers takes whole images: when such a GPU worker is
registered, the broker asks preprocessing for the decoded pixels too and hands them
on with the resized image the crops are cut from.  The real broker and preprocess worker run; the GPU side is a
protocol peer on a real socket (`TransformersWorkerPeer`, a stand-in: the official
remote code cannot be downloaded here) that records what it is given."""
from __future__ import annotations

import io
import threading
import uuid

import numpy as np
import pytest
import zmq
from PIL import Image

from shared import protocol
from shared.image_tiling import split_resized_frame, tile_image
from shared.protocol import CaptionParams, Generate, Ready, Result, SamplingSettings, Submit
from tests.test_broker import PHOTO, services  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(60)


class TransformersWorkerPeer(threading.Thread):
    """Registers as a transformers-engine GPU worker and answers one Generate."""

    def __init__(self, address: str, deployment: str):
        super().__init__(daemon=True)
        self.address = address
        self.deployment = deployment  # the broker refuses a worker of another deployment
        self.received: list = []

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        sock.send_multipart(protocol.encode(Ready(kind=protocol.GPU, worker_id="peer", capacity=1,
                                                  model={"engine": "transformers", "name": "stand-in"},
                                                  deployment=self.deployment)))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self.received:
            if not poller.poll(20000):
                break
            msg, blob = protocol.decode(sock.recv_multipart())
            if isinstance(msg, Generate):
                self.received.append((msg, bytes(blob)))
                sock.send_multipart(protocol.encode(Result(msg.request_id, {"caption": "ok"}, "stop", {})))
            else:
                sock.send_multipart(protocol.encode(protocol.Heartbeat(worker_id="peer", free=1)))
        sock.close()


def test_pixels_travel_with_the_crops_for_the_transformers_engine(services):  # noqa: F811
    s = services()
    s.start("preprocess_worker")
    peer = TransformersWorkerPeer(s.config.broker_backend_addr, s.config.deployment_id)
    peer.start()
    s.wait_for(preprocess=1, gpu=1)
    events = list(s.client.submit(Submit(request_id=uuid.uuid4().hex, skill="caption", params=CaptionParams(length="short"),
                                         settings=SamplingSettings(), has_image=True), PHOTO))
    assert isinstance(events[-1], Result)
    peer.join(5)
    msg, frame = peer.received[0]
    expected = np.asarray(Image.open(io.BytesIO(PHOTO)).convert("RGB"))
    assert tuple(msg.pixels_shape) == expected.shape
    crops, pixels = split_resized_frame(frame, tuple(msg.tiling), tuple(msg.pixels_shape))
    assert np.array_equal(pixels, expected)
    assert np.array_equal(crops, tile_image(Image.fromarray(expected)).crops)  # the crops still travel, bit-exact
