"""Workers on another "host": a network namespace joined to this one by a veth pair.

The broker and the front end run here, in the root namespace; a GPU worker and a
preprocess worker run in a namespace of their own and reach the broker only
across the veth link, the way workers on another machine would.  With CURVE
keys (CURVE_KEYS_DIR, `python -m shared.keys generate`):

* requests go through the remote workers and succeed;
* a remote worker with a key the broker does not list stops with the reason; one
  without keys refuses to start; a plaintext peer is never registered;
* a broker bound on the link without keys refuses to start, saying what to set;
* when the link goes down, a streaming request in flight ends with a 503 event
  and new requests get a 503, within seconds (the broker misses the workers'
  heartbeats), instead of hanging.

Needs root and a kernel that allows network namespaces; skipped otherwise.
The namespace and the veth pair are always removed at the end.
"""
from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shared.config import EXIT_CONFIG
from tests.frontend_helpers import SMALL_IMAGE
from tests.stack import REPO, ProcessGroup, free_port, stack_env
from tests.test_curve import intruder_keys, make_keys

pytestmark = pytest.mark.timeout(180)

IMAGE_URL = "data:image/png;base64," + base64.b64encode(SMALL_IMAGE.read_bytes()).decode()


# A worker that skips our code: a bare DEALER announcing itself in plaintext.
PLAINTEXT_WORKER = """
import sys, zmq
from shared import protocol
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.connect(sys.argv[1])
sock.send_multipart(protocol.encode(protocol.Ready(kind="gpu", worker_id="plaintext")))
print("answered" if sock.poll(3000) else "no answer")
sock.close(linger=0)
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


class RemoteHost:
    """A network namespace with a veth link to the root namespace.

    Addresses come from a random /30 in 10.200.0.0/16 (private, used only
    between the two ends of this link) so that concurrent runs do not clash."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.ns = f"mdtest-{tag}"
        self.local_if, self.remote_if = f"mdr{tag}", f"mdh{tag}"  # at most 15 characters
        third, fourth = random.randrange(256), random.randrange(64) * 4  # 10.200.third.fourth/30
        self.local_ip = f"10.200.{third}.{fourth + 1}"
        self.remote_ip = f"10.200.{third}.{fourth + 2}"

    def create(self) -> None:
        ip("netns", "add", self.ns)
        ip("link", "add", self.local_if, "type", "veth", "peer", "name", self.remote_if)
        ip("link", "set", self.remote_if, "netns", self.ns)
        ip("addr", "add", f"{self.local_ip}/30", "dev", self.local_if)
        ip("link", "set", self.local_if, "up")
        ip("netns", "exec", self.ns, "ip", "addr", "add", f"{self.remote_ip}/30", "dev", self.remote_if)
        ip("netns", "exec", self.ns, "ip", "link", "set", self.remote_if, "up")
        ip("netns", "exec", self.ns, "ip", "link", "set", "lo", "up")

    def cut(self) -> None:
        ip("link", "set", self.local_if, "down")

    def remove(self) -> None:
        # Deleting the namespace deletes its end of the pair, and with it ours.
        ip("netns", "del", self.ns, check=False)
        ip("link", "del", self.local_if, check=False)

    def start(self, env: dict, module: str, log_path: Path, **overrides) -> subprocess.Popen:
        """`python -m module` inside the namespace."""
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", module],
                cwd=REPO, env={**env, **{k: str(v) for k, v in overrides.items()}},
                stdout=log, stderr=subprocess.STDOUT)


def kernel_allows_namespaces() -> str:
    """'' when we can create a namespace, else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = f"mdprobe-{os.getpid()}"
    try:
        result = ip("netns", "add", probe, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        return f"`ip` unavailable: {err}"
    if result.returncode != 0:
        return f"the kernel refuses network namespaces: {result.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return ""


def http(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def health(url: str) -> dict:
    return json.loads(http(url + "/health", timeout=5)[1])


def wait_until(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture
def remote_host():
    why_not = kernel_allows_namespaces()
    if why_not:
        pytest.skip(why_not)
    host = RemoteHost()
    try:
        host.create()
        yield host
    finally:
        host.remove()


@pytest.fixture
def scaled_out(remote_host, tmp_path):
    """Broker and front end here, one GPU and one preprocess worker on the remote host."""
    back = free_port()
    env = stack_env(tmp_path, PREPROCESS_WORKERS=1, CURVE_KEYS_DIR=make_keys(tmp_path / "keys"),
                    BROKER_BACKEND_BIND=f"tcp://{remote_host.local_ip}:{back}",
                    BROKER_BACKEND_ADDR=f"tcp://{remote_host.local_ip}:{back}")
    local = ProcessGroup(env, tmp_path)
    remote: list[subprocess.Popen] = []
    try:
        local.start("broker", "broker")
        local.start("frontend", "frontend")
        remote.append(remote_host.start(env, "gpu_worker", tmp_path / "gpu_worker.log"))
        remote.append(remote_host.start(env, "preprocess_worker", tmp_path / "preprocess.log"))
        url = f"http://127.0.0.1:{env['PORT']}"

        def ready():
            try:
                body = health(url)
            except OSError:
                return None
            return body.get("ready") and body["workers"] == {"preprocess": 1, "gpu": 1}

        wait_until(ready, 90, "the remote workers to register")
        yield url, env, remote_host, tmp_path, remote
    finally:
        for proc in remote:
            if proc.poll() is None:
                proc.terminate()
        for proc in remote:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        local.stop_all()


def test_remote_workers_serve_refuse_other_keys_and_fail_fast_when_cut_off(scaled_out):
    url, env, host, log_dir, remote = scaled_out

    # 1. Requests go through the remote workers (the only ones there are).
    status, body = http(url + "/v1/caption", {"image_url": IMAGE_URL, "settings": {"max_tokens": 4, "temperature": 0}})
    assert status == 200, body
    assert json.loads(body)["caption"] is not None
    status, body = http(url + "/v1/query", {"question": "Hi?", "settings": {"max_tokens": 4}})
    assert status == 200, body

    # 2. Across the link, a worker with a key the broker does not list is turned away and says why;
    #    one without keys does not start; a plaintext peer never registers.
    intruder = host.start(env, "preprocess_worker", log_dir / "intruder.log",
                          CURVE_KEYS_DIR=intruder_keys(Path(env["CURVE_KEYS_DIR"]), log_dir))
    remote.append(intruder)
    assert intruder.wait(timeout=30) == EXIT_CONFIG
    assert "refused this worker's CURVE key" in (log_dir / "intruder.log").read_text()
    assert "refused a worker connection" in (log_dir / "broker.log").read_text()
    keyless = host.start(env, "gpu_worker", log_dir / "keyless.log", CURVE_KEYS_DIR="")
    remote.append(keyless)
    assert keyless.wait(timeout=60) == EXIT_CONFIG
    assert "BROKER_BACKEND_ADDR=" in (log_dir / "keyless.log").read_text()
    plaintext = subprocess.run(
        ["ip", "netns", "exec", host.ns, sys.executable, "-c", PLAINTEXT_WORKER, env["BROKER_BACKEND_ADDR"]],
        cwd=REPO, capture_output=True, text=True, timeout=30)
    assert plaintext.stdout.strip() == "no answer", plaintext.stdout + plaintext.stderr
    assert health(url)["workers"] == {"preprocess": 1, "gpu": 1}

    # 3. Cut the link while a long streamed answer is being generated.
    events: list[tuple[float, dict]] = []
    first_chunk = threading.Event()

    def stream():
        req = urllib.request.Request(
            url + "/v1/query",
            json.dumps({"question": "Tell me a long story.", "stream": True,
                        "settings": {"max_tokens": 2048, "temperature": 1}}).encode(),
            {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            for line in resp:
                if line.startswith(b"data: "):
                    events.append((time.monotonic(), json.loads(line[len(b"data: "):])))
                    first_chunk.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert first_chunk.wait(30), "the stream never started"
    cut_at = time.monotonic()
    host.cut()
    reader.join(30)
    assert not reader.is_alive(), "the stream hung after the link went down"
    ended_at, last = events[-1]
    assert last["completed"] and last["error"]["status"] == 503, last
    expiry = float(env["HEARTBEAT_INTERVAL"]) * int(env["HEARTBEAT_LIVENESS"])
    assert ended_at - cut_at < expiry + 5, f"took {ended_at - cut_at:.1f} s to fail"

    # 4. New requests: 503 within seconds (NO_GPU_GRACE), and /health says not ready.
    started = time.monotonic()
    status, body = http(url + "/v1/query", {"question": "Anyone there?", "settings": {"max_tokens": 4}})
    assert status == 503, body
    assert time.monotonic() - started < float(env["NO_GPU_GRACE"]) + 5
    assert health(url)["ready"] is False


def test_a_broker_bound_on_the_link_without_keys_refuses_to_start(remote_host, tmp_path):
    address = f"tcp://{remote_host.local_ip}:{free_port()}"
    env = stack_env(tmp_path, BROKER_BACKEND_BIND=address)
    broker = ProcessGroup(env, tmp_path).start("broker", "broker")
    assert broker.wait(timeout=30) == EXIT_CONFIG
    log = (tmp_path / "broker.log").read_text()
    assert f"BROKER_BACKEND_BIND={address} is reachable beyond this host, but no CURVE keys are set" in log, log
