"""Starting the service as a new user does: `bash scripts/serve.sh`, twice, on a taken port, offline.

Each case ends within 30 s with one line saying what is wrong and a non-zero exit status, and a
copy already running keeps serving and counting (/metrics) as if nothing had happened.  The first
copy runs under real supervisord exactly as serve.sh starts it (tests/stack.py); the second is
the real script (SKIP_SETUP=1: the test venv is ready, no pip run).
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.stack import REPO, launch_stack, running_stack, stack_env, wait_for

pytestmark = pytest.mark.timeout(240)

SERVE_LIMIT_S = 30  # the bound: the one line and the exit status come within it


def serve(env: dict, timeout: float = SERVE_LIMIT_S) -> subprocess.CompletedProcess:
    """`bash scripts/serve.sh` as run from a terminal; what it printed and its exit status."""
    return subprocess.run(["bash", "scripts/serve.sh"], cwd=REPO, env={**env, "SKIP_SETUP": "1"},
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


def printed_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def caption_count(stack) -> float:
    """moondream_http_requests_total for 200 answers on /v1/caption, as /metrics says now."""
    with urllib.request.urlopen(stack.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    pattern = r'moondream_http_requests_total\{[^}]*route="/v1/caption"[^}]*status="200"[^}]*\} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, text))


def ask(stack) -> None:
    """One real answer through the whole stack, counted on /metrics (route /v1/caption)."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "PNG")
    body = json.dumps({"image_url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
                       "length": "short", "settings": {"max_tokens": 2}}).encode()
    req = urllib.request.Request(stack.url + "/v1/caption", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=60).read()


def keeps_counting(stack) -> None:
    before = caption_count(stack)
    ask(stack)
    wait_for(lambda: caption_count(stack) == before + 1, 10, "/metrics to count the new request", stack)


@pytest.fixture(scope="module")
def first():
    """The copy already running, DEPLOYMENT_ID left to supervisord as serve.sh leaves it."""
    with running_stack(preprocess_workers=1, DEPLOYMENT_ID="") as stack:
        wait_for(lambda: "listening on http://127.0.0.1:" in stack.terminal(), 30, "the listening line", stack)
        ask(stack)
        yield stack


def test_serving_twice_from_one_checkout_is_refused_before_anything_is_touched(first):
    metrics_files = sorted(p.name for p in (first.run_dir / "frontend-metrics").iterdir())
    assert metrics_files
    started = time.monotonic()
    done = serve(first.env)  # same RUN_DIR, same ports: a second `bash scripts/serve.sh` from this checkout
    assert done.returncode == 1 and time.monotonic() - started < SERVE_LIMIT_S
    lines = printed_lines(done)
    assert len(lines) == 1, lines
    supervisord_pid = (first.run_dir / "supervisord.pid").read_text().strip()
    assert lines[0].startswith(f"the service already runs from RUN_DIR={first.run_dir} (supervisord pid "
                               f"{supervisord_pid})"), lines
    # Nothing touched: the running copy's counters are all there and it keeps counting.
    assert sorted(p.name for p in (first.run_dir / "frontend-metrics").iterdir()) == metrics_files
    keeps_counting(first)


def test_a_second_copy_on_the_same_port_with_its_own_run_dir_is_refused(first, tmp_path):
    env = stack_env(tmp_path / "second", PORT=first.port, DEPLOYMENT_ID="")
    started = time.monotonic()
    done = serve(env)
    assert done.returncode == 1 and time.monotonic() - started < SERVE_LIMIT_S
    lines = printed_lines(done)
    assert lines == [f"cannot start: PORT 127.0.0.1:{first.port} is taken (Address already in use), by another "
                     f"program or another copy of this service; set PORT to a free port"], lines
    assert not (tmp_path / "second").exists()  # refused before anything was made
    keeps_counting(first)


def test_a_port_held_by_another_program_is_named_at_once(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        started = time.monotonic()
        done = serve(stack_env(tmp_path / "run", PORT=port))
        assert done.returncode == 1 and time.monotonic() - started < SERVE_LIMIT_S
    lines = printed_lines(done)
    assert len(lines) == 1 and lines[0].startswith(f"cannot start: PORT 127.0.0.1:{port} is taken"), lines


def test_without_supervisord_a_second_copy_on_the_port_is_named_not_announced(first):
    """Should a second copy get past serve.sh's check (started by hand, or racing the first), its own
    front end stays down at once (exit 78, no retries) and its ready notice does not take the first
    copy's /health for its own."""
    second = launch_stack(preprocess_workers=1, DEPLOYMENT_ID="", PORT=first.port)
    try:
        wait_for(lambda: "frontend:frontend_00 cannot start (exit 78): " in second.terminal(), SERVE_LIMIT_S,
                 "the terminal to name the front end", second)
        wait_for(lambda: second.states()["frontend:frontend_00"] == "STOPPED", 10, "the front end stopped", second)
        log = second.log("frontend_00")
        assert log.count("cannot listen on") == 1, log  # stopped at once: not retried
        # Its broker and workers are up and register with each other; /health on the port is the first copy's.
        wait_for(lambda: second.states().get("gpu_worker") == "RUNNING", 30, "the second GPU worker", second)
        time.sleep(3)  # the notice polls every second: it would have spoken by now
        assert "listening on" not in second.terminal(), second.terminal()
        keeps_counting(first)
    finally:
        second.stop()
        shutil.rmtree(second.run_dir, ignore_errors=True)


def offline_env(run_dir: Path, hf_home: Path, **overrides) -> dict:
    # The hub's model id with no way to fetch it: HF_HUB_OFFLINE and an empty cache.
    return {**stack_env(run_dir, MOONDREAM_MODEL="vikhyatk/moondream2", HF_HUB_OFFLINE="1", HF_HOME=str(hf_home),
                        PREPROCESS_WORKERS=1, **overrides)}


def test_a_model_that_cannot_be_fetched_stops_serve_sh_with_its_line(tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    done = serve(offline_env(run_dir, tmp_path / "hf"), timeout=SERVE_LIMIT_S + 30)
    elapsed = time.monotonic() - started
    lines = printed_lines(done)
    assert done.returncode == 1, (done.returncode, lines)
    assert elapsed < SERVE_LIMIT_S, elapsed
    assert len(lines) == 1 and lines[0].startswith("gpu_worker cannot start (exit 78): "), lines
    assert "could not fetch vikhyatk/moondream2@2025-06-21 from the Hugging Face hub" in lines[0]
    assert (run_dir / "not-started").exists()
    assert (run_dir / "gpu_worker.log").read_text().count("loading model") == 1  # one try, no restart


def test_a_model_that_cannot_be_fetched_stays_down_and_health_says_why(tmp_path):
    """Under supervisord alone (no STOP_WHEN_DOWN) the rest keeps running: /health says why it is not ready."""
    stack = launch_stack(preprocess_workers=1, **{k: v for k, v in offline_env(tmp_path / "unused", tmp_path / "hf").items()
                                                  if k in ("MOONDREAM_MODEL", "HF_HUB_OFFLINE", "HF_HOME")})
    try:
        wait_for(lambda: "could not fetch" in stack.health()[1].get("reason", ""), SERVE_LIMIT_S,
                 "/health to say why", stack)
        code, health = stack.health()
        assert code == 503 and health["reason"].startswith("the GPU worker cannot start: model load failed: could not "
                                                           "fetch vikhyatk/moondream2@2025-06-21"), health
        wait_for(lambda: stack.states()["gpu_worker"] == "STOPPED", 10, "the GPU worker stopped", stack)
        wait_for(lambda: "gpu_worker cannot start (exit 78): " in stack.terminal(), 5, "the terminal line", stack)
        time.sleep(5)  # a restart loop would have tried again by now
        assert stack.log("gpu_worker").count("loading model") == 1
        assert stack.states()["gpu_worker"] == "STOPPED"
    finally:
        stack.stop()
        shutil.rmtree(stack.run_dir, ignore_errors=True)
