"""CURVE on the broker's sockets (loopback here; tests/test_scale_out_netns.py does it across hosts).

* `python -m shared.keys generate DIR` makes the key pairs;
* a broker, front end or worker whose broker address leaves this host refuses to start without
  keys, saying what to set;
* with keys, a worker with an allowed key joins and serves; one with another key stops with the
  reason; a plaintext peer is never registered; a front end with another key gets the reason in
  `problem` (its /health) instead of answers.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zmq
import zmq.auth

from broker_client.client import BrokerClient
from shared import protocol
from shared.config import EXIT_CONFIG
from shared.protocol import CaptionParams, QueryParams, Ready, Submit
from tests.stack import REPO, ProcessGroup, config_from_env, stack_env

pytestmark = pytest.mark.timeout(120)


def make_keys(directory: Path) -> Path:
    subprocess.run([sys.executable, "-m", "shared.keys", "generate", str(directory)], cwd=REPO, check=True,
                   capture_output=True, timeout=30)
    return directory


def intruder_keys(good: Path, tmp_path: Path) -> Path:
    """The real broker.key (so it finds the broker) but worker and front-end keys of their own."""
    bad = make_keys(tmp_path / "other")
    shutil.copy(good / "broker.key", bad / "broker.key")
    return bad


def wait_for_status(client: BrokerClient, timeout: float = 30, **counts) -> protocol.Status:
    end = time.monotonic() + timeout
    status = None
    while time.monotonic() < end:
        status = client.status(timeout=0.5)
        if status and all(getattr(status, f"{kind}_workers") == n for kind, n in counts.items()):
            return status
        time.sleep(0.1)
    raise AssertionError(f"workers not as expected: {status}; problem: {client.problem}")


def test_generate_makes_the_three_key_pairs_with_private_secrets(tmp_path):
    keys = make_keys(tmp_path / "keys")
    for name in ("broker", "worker", "frontend"):
        assert (keys / f"{name}.key").read_text().count("public-key") == 1
        assert (keys / f"{name}.key_secret").stat().st_mode & 0o077 == 0
    before = (keys / "broker.key_secret").read_bytes()
    make_keys(keys)  # again: existing keys are kept
    assert (keys / "broker.key_secret").read_bytes() == before


@pytest.mark.parametrize("module, setting", [
    ("broker", "BROKER_BACKEND_BIND"), ("broker", "BROKER_FRONTEND_BIND"),
    ("preprocess_worker", "BROKER_BACKEND_ADDR"), ("gpu_worker", "BROKER_BACKEND_ADDR"),
    ("frontend", "BROKER_FRONTEND_ADDR"), ("batch_worker", "BROKER_FRONTEND_ADDR"),
])
def test_an_address_beyond_loopback_without_keys_is_refused_at_start(tmp_path, module, setting):
    # Refused before any socket is bound or connected: no traffic leaves the machine.
    address = "tcp://0.0.0.0:5556" if setting.endswith("BIND") else "tcp://192.0.2.1:5556"
    env = stack_env(tmp_path, **{setting: address})
    proc = ProcessGroup(env, tmp_path).start(module, module)
    assert proc.wait(timeout=60) == EXIT_CONFIG
    log = proc.log_path.read_text()
    assert f"{setting}={address} is reachable beyond this host, but no CURVE keys are set" in log, log
    assert "python -m shared.keys generate DIR" in log and "CURVE_KEYS_DIR" in log
    assert "Traceback" not in log


def test_keyed_workers_join_and_serve_other_keys_and_plaintext_peers_do_not(tmp_path):
    keys = make_keys(tmp_path / "keys")
    env = stack_env(tmp_path, CURVE_KEYS_DIR=keys, NO_GPU_GRACE=0.5)
    group = ProcessGroup(env, tmp_path)
    client = BrokerClient(config_from_env(env))
    plain = zmq.Context.instance().socket(zmq.DEALER)
    try:
        group.start("broker", "broker")
        group.start("preprocess_worker", "allowed")
        wait_for_status(client, preprocess=1, gpu=0)
        # It serves: the image is decoded by the keyed worker (503 only because no GPU worker runs).
        image = (REPO / "tests/conformance/main/images/photo_773x767.jpg").read_bytes()
        events = list(client.submit(Submit(request_id=uuid.uuid4().hex, skill="caption", params=CaptionParams(),
                                           has_image=True), image))
        assert (events[-1].status, events[-1].code) == (503, "no_gpu_worker")

        intruder = group.start("preprocess_worker", "intruder", CURVE_KEYS_DIR=intruder_keys(keys, tmp_path))
        assert intruder.wait(timeout=30) == EXIT_CONFIG
        assert "refused this worker's CURVE key" in intruder.log_path.read_text()
        assert "refused a worker connection" in (tmp_path / "broker.log").read_text()

        plain.connect(env["BROKER_BACKEND_ADDR"])  # no CURVE at all: the handshake never completes
        plain.send_multipart(protocol.encode(Ready(kind="gpu", worker_id="plain")), zmq.NOBLOCK)
        time.sleep(1.0)
        assert wait_for_status(client, preprocess=1, gpu=0).gpu_ready is False
    finally:
        plain.close(linger=0)
        client.close()
        group.stop_all()


def test_a_front_end_with_another_key_gets_the_reason_not_answers(tmp_path):
    keys = make_keys(tmp_path / "keys")
    env = stack_env(tmp_path, CURVE_KEYS_DIR=keys)
    group = ProcessGroup(env, tmp_path)
    stranger = BrokerClient(config_from_env({**env, "CURVE_KEYS_DIR": str(intruder_keys(keys, tmp_path))}))
    try:
        group.start("broker", "broker")
        end = time.monotonic() + 20
        while not stranger.problem and time.monotonic() < end:
            time.sleep(0.1)
        assert "refused this front end's CURVE key" in (stranger.problem or ""), stranger.problem
        assert stranger.status(timeout=0.5) is None
        events = list(stranger.submit(Submit(request_id="r", skill="query", params=QueryParams(question="q"))))
        assert [(e.status, e.code) for e in events] == [(503, "broker_unavailable")]
    finally:
        stranger.close()
        group.stop_all()


def test_a_secret_key_is_never_readable_by_others_not_even_before_its_chmod(tmp_path, monkeypatch):
    """The secret is created 0600 (os.open's mode), not written with the umask's 0644 and chmodded
    after: a crash at the chmod (FakeCrashAtChmod, fault injection) leaves no readable secret."""
    from shared import keys

    def fake_crash_at_chmod(*_args, **_kwargs):
        raise OSError("FakeCrashAtChmod")

    old_umask = os.umask(0o022)
    try:
        monkeypatch.setattr(os, "chmod", fake_crash_at_chmod)
        monkeypatch.setattr(Path, "chmod", fake_crash_at_chmod)
        with pytest.raises(OSError, match="FakeCrashAtChmod"):
            keys.generate(tmp_path)
    finally:
        os.umask(old_umask)
    secrets = list(tmp_path.glob("*.key_secret"))
    assert secrets, "generate wrote nothing before the chmod"
    for secret in secrets:
        assert secret.stat().st_mode & 0o077 == 0, oct(secret.stat().st_mode)
    monkeypatch.undo()
    made = keys.generate(tmp_path / "ok")
    public, secret = zmq.auth.load_certificate(tmp_path / "ok" / "broker.key_secret")
    assert zmq.auth.load_certificate(tmp_path / "ok" / "broker.key") == (public, None)
    assert len(public) == 40 and len(secret) == 40 and len(made) == 6
