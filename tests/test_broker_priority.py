"""The broker serves interactive requests before queued batch lines (protocol.BACKGROUND).

A real broker process; the GPU worker is a fake (a DEALER socket in this test)
so that the test decides when a slot frees and sees the order of Generates."""
from __future__ import annotations

import dataclasses
import time

import pytest
import zmq

from batch_worker.worker import BatchWorker
from broker_client.client import BrokerClient
from shared import priority, protocol
from shared.protocol import Generate, Heartbeat, QueryParams, Ready, Result, Submit
from shared.batch_store import BatchStore
from tests.test_batch_store import scan, upload
from tests.stack import ProcessGroup, config_from_env, stack_env, wait_for

pytestmark = pytest.mark.timeout(60)


class FakeGpuWorker:
    """A GPU worker of `capacity` slots, reporting them honestly in its heartbeats; it answers
    only when told to.  Its model runs on `device` (as far as the broker can tell)."""

    def __init__(self, config, capacity: int = 1, device: str = "cpu"):
        self.capacity, self.held = capacity, []
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(config.broker_backend_addr)
        self.socket.send_multipart(protocol.encode(Ready(kind=protocol.GPU, worker_id="fake-gpu", capacity=capacity,
                                                         model={"device": device}, deployment=config.deployment_id)))

    def collect(self, seconds: float, until: int = 0) -> list[str]:
        """Heartbeat and take Generates for `seconds`, or until `until` are held."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and len(self.held) >= until):
            self.socket.send_multipart(protocol.encode(Heartbeat(worker_id="fake-gpu", free=self.capacity - len(self.held))))
            if self.socket.poll(100):
                msg, _ = protocol.decode(self.socket.recv_multipart())
                if isinstance(msg, Generate):
                    self.held.append(msg.request_id)
        return self.held

    def next_generate(self, timeout: float = 10.0) -> str:
        before = len(self.held)
        if len(self.collect(timeout, until=before + 1)) == before:
            raise AssertionError("no Generate came")
        return self.held[-1]

    def answer(self, request_id: str) -> None:
        self.held.remove(request_id)
        self.socket.send_multipart(protocol.encode(Result(request_id, {"answer": "ok"})))


@pytest.fixture
def broker(tmp_path):
    """A real broker process and a client of it; yields (config, submit, queued): queued(n) waits
    until the broker's queue holds n requests (its Status says so), instead of sleeping."""
    env = stack_env(tmp_path)
    config = config_from_env(env)
    group = ProcessGroup(env, tmp_path)
    group.start("broker", "broker")
    client = BrokerClient(config)

    def submit(rid: str, priority: int):
        return client.submit(Submit(request_id=rid, skill="query", params=QueryParams(question="q"),
                                    priority=priority))

    def queued(n: int) -> None:
        wait_for(lambda: (status := client.status(1.0)) is not None and status.queued == n, 10,
                 f"{n} requests queued at the broker")

    try:
        yield config, submit, queued
    finally:
        client.close()
        group.stop_all()


def test_interactive_requests_overtake_queued_batch_lines(broker):
    config, submit, queued = broker
    gpu = FakeGpuWorker(config)
    streams = [submit("first", protocol.INTERACTIVE)]
    assert gpu.next_generate() == "first"  # holds the only slot
    streams += [submit("batch-1", protocol.BACKGROUND), submit("batch-2", protocol.BACKGROUND)]
    queued(2)  # both queued before the interactive one arrives
    streams.append(submit("interactive", protocol.INTERACTIVE))
    queued(3)
    order, running = [], "first"
    for _ in range(3):  # each answer frees the slot for the next in line
        gpu.answer(running)
        running = gpu.next_generate()
        order.append(running)
    gpu.answer(running)
    assert order == ["interactive", "batch-1", "batch-2"]
    for stream in streams:
        assert isinstance(list(stream)[-1], Result)


def test_batch_lines_never_hold_every_gpu_slot(broker):
    config, submit, _ = broker
    gpu = FakeGpuWorker(config, capacity=4)
    streams = [submit(f"batch-{i}", protocol.BACKGROUND) for i in range(6)]
    gpu.collect(10, until=3)
    assert gpu.collect(1.0) == ["batch-0", "batch-1", "batch-2"]  # and no more: background_slots(4) = 3
    assert priority.background_slots(4) == 3 and priority.background_slots(1) == 1
    streams.append(submit("interactive", protocol.INTERACTIVE))
    assert gpu.next_generate() == "interactive"  # dispatched at once, into the kept slot
    for rid in list(gpu.held):
        gpu.answer(rid)
    assert sorted(gpu.collect(10, until=3)) == ["batch-3", "batch-4", "batch-5"]  # the rest, once slots free
    for rid in list(gpu.held):
        gpu.answer(rid)
    for stream in streams:
        assert isinstance(list(stream)[-1], Result)


def test_the_policy_narrows_batch_lines_while_interactive_requests_come():
    assert [priority.background_slots(n) for n in (1, 4, 8, 32)] == [1, 3, 6, 24]
    assert [priority.background_slots(n, interactive=True) for n in (1, 4, 8, 32)] == [1, 1, 1, 4]
    assert priority.narrows_on("cpu") and not priority.narrows_on("cuda:0")
    traffic = priority.InteractiveTraffic()
    assert not traffic.present(100.0)
    traffic.started(100.0)
    assert traffic.present(100.0 + 10 * priority.INTERACTIVE_LINGER_S)  # in flight: present however long
    traffic.ended(200.0)
    assert traffic.present(200.0 + priority.INTERACTIVE_LINGER_S / 2)
    assert not traffic.present(200.0 + priority.INTERACTIVE_LINGER_S)


def test_the_broker_narrows_batch_lines_while_an_interactive_request_runs(broker):
    config, submit, queued = broker
    gpu = FakeGpuWorker(config, capacity=8)
    streams = [submit("interactive", protocol.INTERACTIVE)]
    assert gpu.next_generate() == "interactive"
    streams += [submit(f"batch-{i}", protocol.BACKGROUND) for i in range(6)]
    gpu.collect(10, until=2)
    queued(5)  # background_slots(8, interactive=True) = 1 line on the worker; the other 5 wait
    assert gpu.held == ["interactive", "batch-0"]
    gpu.answer("interactive")
    answered = time.monotonic()
    assert gpu.next_generate() == "batch-1"
    # the narrowing outlasts the request by INTERACTIVE_LINGER_S, then the lines widen to 6
    assert time.monotonic() - answered >= priority.INTERACTIVE_LINGER_S * 0.9
    assert sorted(gpu.collect(10, until=6)) == [f"batch-{i}" for i in range(6)]
    for rid in list(gpu.held):
        gpu.answer(rid)
    for stream in streams:
        assert isinstance(list(stream)[-1], Result)


def test_a_worker_on_a_gpu_takes_batch_lines_wide_beside_an_interactive_request(broker):
    config, submit, _ = broker
    gpu = FakeGpuWorker(config, capacity=8, device="cuda:0")
    streams = [submit("interactive", protocol.INTERACTIVE)]
    assert gpu.next_generate() == "interactive"
    streams += [submit(f"batch-{i}", protocol.BACKGROUND) for i in range(6)]
    assert sorted(gpu.collect(10, until=7)) == sorted(["interactive"] + [f"batch-{i}" for i in range(6)])
    for rid in list(gpu.held):
        gpu.answer(rid)
    for stream in streams:
        assert isinstance(list(stream)[-1], Result)


class SubmitOnlyClient:
    """The real BrokerClient, offering the batch worker only `submit`: a call to anything else
    (Status polling) fails the test with an AttributeError."""

    def __init__(self, client: BrokerClient):
        self.submit = client.submit


def test_the_batch_worker_only_submits_background_lines(broker, tmp_path):
    """Fairness is the broker's and the scheduler's job (shared/priority.py): the batch worker
    marks its lines BACKGROUND and never asks the broker whether interactive requests run."""
    config, submit, _ = broker
    store = BatchStore(tmp_path / "batch-data")
    worker_config = dataclasses.replace(config, batch_data_dir=str(store.root), batch_in_flight=4)
    client = BrokerClient(config)
    loop = BatchWorker(worker_config, client=SubmitOnlyClient(client), store=store)
    gpu = FakeGpuWorker(config, capacity=4)
    try:
        job = upload(store, b'{"skill": "query", "question": "hi"}\n' * 6)
        store.set_lines(job["id"], scan(store, job))
        loop.step()  # housekeeping finds the job; its lines go to the broker
        interactive = submit("interactive", protocol.INTERACTIVE)
        generates = []
        end = time.monotonic() + 10
        # until the interactive request and at least one line are on the worker (lines that reached
        # the broker before the interactive request went wide: up to background_slots(4) of them)
        while not (protocol.INTERACTIVE in {g.priority for g in generates} and len(generates) >= 2) \
                and time.monotonic() < end:
            gpu.socket.send_multipart(protocol.encode(Heartbeat(worker_id="fake-gpu", free=4 - len(generates))))
            if gpu.socket.poll(100):
                msg, _ = protocol.decode(gpu.socket.recv_multipart())
                if isinstance(msg, Generate):
                    generates.append(msg)
            loop.step()
        lines = [g for g in generates if g.priority == protocol.BACKGROUND]
        assert len(lines) == len(generates) - 1 and 1 <= len(lines) <= priority.background_slots(4)
        for g in generates:
            gpu.socket.send_multipart(protocol.encode(Result(g.request_id, {"answer": "ok"})))
        assert isinstance(list(interactive)[-1], Result)
    finally:
        loop.stopping = True
        loop.chunker.shutdown(wait=True)
        loop.pool.shutdown(wait=False, cancel_futures=True)
        client.close()
