"""The broker serves interactive requests before queued batch lines (protocol.BACKGROUND).

A real broker process; the GPU worker is a fake (a DEALER socket in this test)
so that the test decides when a slot frees and sees the order of Generates."""
from __future__ import annotations

import time

import pytest
import zmq

from frontend.broker_client import BrokerClient
from shared import protocol
from shared.protocol import Generate, Heartbeat, Ready, Result, Submit
from tests.stack import ProcessGroup, config_from_env, stack_env

pytestmark = pytest.mark.timeout(60)


class FakeGpuWorker:
    """One slot; answers only when told to."""

    def __init__(self, config):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(config.broker_backend_addr)
        self.socket.send_multipart(protocol.encode(Ready(kind=protocol.GPU, worker_id="fake-gpu", capacity=1,
                                                         deployment=config.deployment_id)))

    def next_generate(self, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.socket.send_multipart(protocol.encode(Heartbeat(worker_id="fake-gpu", free=0)))
            if self.socket.poll(200):
                msg, _ = protocol.decode(self.socket.recv_multipart())
                if isinstance(msg, Generate):
                    return msg.request_id
        raise AssertionError("no Generate came")

    def answer(self, request_id: str) -> None:
        self.socket.send_multipart(protocol.encode(Result(request_id, {"answer": "ok"})))


def test_interactive_requests_overtake_queued_batch_lines(tmp_path):
    env = stack_env(tmp_path)
    config = config_from_env(env)
    group = ProcessGroup(env, tmp_path)
    group.start("broker", "broker")
    client = BrokerClient(config)
    gpu = FakeGpuWorker(config)
    try:
        def submit(rid: str, priority: int):
            return client.submit(Submit(request_id=rid, skill="query", params={"question": "q"}, settings={},
                                        priority=priority))

        streams = [submit("first", protocol.INTERACTIVE)]
        assert gpu.next_generate() == "first"  # holds the only slot
        streams += [submit("batch-1", protocol.BACKGROUND), submit("batch-2", protocol.BACKGROUND)]
        time.sleep(0.3)  # both queued before the interactive one arrives
        streams.append(submit("interactive", protocol.INTERACTIVE))
        time.sleep(0.3)
        order, running = [], "first"
        for _ in range(3):  # each answer frees the slot for the next in line
            gpu.answer(running)
            running = gpu.next_generate()
            order.append(running)
        gpu.answer(running)
        assert order == ["interactive", "batch-1", "batch-2"]
        for stream in streams:
            assert isinstance(list(stream)[-1], Result)
    finally:
        client.close()
        group.stop_all()


class FakeGpuWorkerWithSlots(FakeGpuWorker):
    """`capacity` slots, reported honestly in its heartbeats; collects every Generate it gets."""

    def __init__(self, config, capacity: int):
        self.capacity, self.held = capacity, []
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(config.broker_backend_addr)
        self.socket.send_multipart(protocol.encode(Ready(kind=protocol.GPU, worker_id="fake-gpu", capacity=capacity,
                                                         deployment=config.deployment_id)))

    def collect(self, seconds: float) -> list[str]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.socket.send_multipart(protocol.encode(Heartbeat(worker_id="fake-gpu", free=self.capacity - len(self.held))))
            if self.socket.poll(100):
                msg, _ = protocol.decode(self.socket.recv_multipart())
                if isinstance(msg, Generate):
                    self.held.append(msg.request_id)
        return self.held


def test_batch_lines_never_hold_every_gpu_slot(tmp_path):
    env = stack_env(tmp_path)
    config = config_from_env(env)
    group = ProcessGroup(env, tmp_path)
    group.start("broker", "broker")
    client = BrokerClient(config)
    gpu = FakeGpuWorkerWithSlots(config, capacity=4)
    try:
        def submit(rid: str, priority: int):
            return client.submit(Submit(request_id=rid, skill="query", params={"question": "q"}, settings={},
                                        priority=priority))

        streams = [submit(f"batch-{i}", protocol.BACKGROUND) for i in range(6)]
        held = gpu.collect(1.5)
        assert held == ["batch-0", "batch-1", "batch-2"]  # background_slots(4): one slot stays free
        assert protocol.background_slots(4) == 3 and protocol.background_slots(1) == 1
        streams.append(submit("interactive", protocol.INTERACTIVE))
        assert gpu.collect(1.5)[-1] == "interactive"  # dispatched at once, into the kept slot
        for rid in list(gpu.held):
            gpu.answer(rid)
        gpu.held.clear()
        assert sorted(gpu.collect(1.5)) == ["batch-3", "batch-4", "batch-5"]  # the rest, once slots free
        for rid in list(gpu.held):
            gpu.answer(rid)
        for stream in streams:
            assert isinstance(list(stream)[-1], Result)
    finally:
        client.close()
        group.stop_all()
