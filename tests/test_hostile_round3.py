"""Hostile input, round three (issue 22), against the real stack under supervisord:
the batch worker, the chat API's stop strings, upload quotas, request ids a client
chooses, the Host header, and start-up settings that would leave the door open.

Each test here failed on the code before the fix; the pure parts (KMP stop matching,
the store's atomic size check, the chunker's rules) are checked in finer detail in
tests/test_chat_rendering.py and tests/test_batch_store.py.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from shared.config import load_config
from tests.frontend_helpers import warm_up
from tests.stack import REPO, ProcessGroup, running_stack, stack_env, wait_for

pytestmark = pytest.mark.timeout(300)

MAX_FILE_BYTES = 1_000_000
MAX_OPEN_UPLOADS = 4
TEXT_LINE = json.dumps({"skill": "query", "question": "Say hi.", "settings": {"max_tokens": 2, "temperature": 0}})


@pytest.fixture(scope="module")
def stack():
    with running_stack(REQUEST_TIMEOUT=30, BATCH_MAX_FILE_BYTES=MAX_FILE_BYTES, BATCH_MAX_LINE_BYTES=100_000,
                       BATCH_MAX_OPEN_UPLOADS=MAX_OPEN_UPLOADS) as s:
        warm_up(s)
        yield s


def call(stack, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict, float]:
    """(status, JSON body, seconds taken)."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=timeout)
    started = time.monotonic()
    try:
        conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw) if raw else {}, time.monotonic() - started


def start_upload(stack) -> tuple[str, str]:
    status, body, _ = call(stack, "POST", "/v1/batch?action=mpu-create")
    assert status == 200, body
    return body["fileId"], body["uploadId"]


def put_part(stack, file_id: str, upload_id: str, number: int, data: bytes) -> tuple[int, dict]:
    status, body, _ = call(stack, "PUT", f"/v1/batch/{file_id}?action=mpu-uploadpart&uploadId={upload_id}"
                                         f"&partNumber={number}", data, {"Content-Type": "application/octet-stream"})
    return status, body


def abort(stack, file_id: str, upload_id: str) -> None:
    status, body, _ = call(stack, "DELETE", f"/v1/batch/{file_id}?action=mpu-abort&uploadId={upload_id}")
    assert status == 200, body


def submit_job(stack, data: bytes) -> str:
    file_id, upload_id = start_upload(stack)
    status, part = put_part(stack, file_id, upload_id, 1, data)
    assert status == 200, part
    status, body, _ = call(stack, "POST", f"/v1/batch/{file_id}?action=mpu-complete&uploadId={upload_id}",
                           json.dumps({"parts": [{"partNumber": 1, "etag": part["etag"]}]}).encode())
    assert status == 200, body
    return body["id"]


def job(stack, job_id: str, headers: dict | None = None) -> dict:
    status, body, _ = call(stack, "GET", f"/v1/batch/{job_id}", headers=headers)
    assert status == 200, body
    return body


def wait_finished(stack, job_id: str, timeout: float = 120) -> dict:
    wait_for(lambda: job(stack, job_id)["status"] in ("completed", "failed", "cancelled"), timeout,
             f"job {job_id} to finish", stack)
    return job(stack, job_id)


# ---------------------------------------------------------------- 1. HIGH: the batch worker's crash loop
def test_a_deeply_nested_line_fails_its_job_and_the_batch_worker_stays_up(stack):
    """2,000 nested brackets used to raise RecursionError out of the line check: the worker
    exited, supervisord restarted it every few seconds and the job stayed "chunking"."""
    worker_pid = stack.pid("batch_worker")
    nested = json.dumps({"skill": "query", "question": "hi"})[:-1] + ', "x": ' + "[" * 2000 + "]" * 2000 + "}"
    bad = submit_job(stack, (TEXT_LINE + "\n" + nested + "\n").encode())
    failed = wait_finished(stack, bad, timeout=60)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "validation_error" and "line 2 is nested too deeply" in failed["error"]["message"]
    good = wait_finished(stack, submit_job(stack, (TEXT_LINE + "\n").encode()))
    assert good["status"] == "completed" and good["progress"]["completed"] == 1, good
    assert stack.pid("batch_worker") == worker_pid, "the batch worker restarted"


def test_a_bom_and_blank_lines_at_the_end_do_not_fail_a_job(stack):
    done = wait_finished(stack, submit_job(stack, b"\xef\xbb\xbf" + TEXT_LINE.encode() + b"\r\n\n\n"))
    assert done["status"] == "completed" and done["progress"] == {"total": 1, "completed": 1, "failed": 0}, done


# ---------------------------------------------------------------- 2. HIGH: chat stop strings
def chat(stack, stop) -> tuple[int, dict, float]:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3, "temperature": 0, "stop": stop}
    return call(stack, "POST", "/v1/chat/completions", json.dumps(body).encode())


def test_chat_stop_strings_are_bounded(stack):
    """One 1,000,000-character stop held a front end for 18 s (quadratic matching)."""
    status, body, _ = chat(stack, "x" * 1_000_000)
    assert status == 400 and body["error"]["param"] == "stop" and "1024" in body["error"]["message"], body
    status, body, _ = chat(stack, ["a"] * 5)
    assert status == 400 and body["error"]["param"] == "stop", body
    status, body, _ = chat(stack, ["a" * 1023 + "b", "z" * 1024, "y", "x"])  # the most allowed
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body


# ---------------------------------------------------------------- 3. MEDIUM: quotas, atomic size check
def test_open_uploads_are_bounded(stack):
    opened = [start_upload(stack) for _ in range(MAX_OPEN_UPLOADS)]
    try:
        status, body, _ = call(stack, "POST", "/v1/batch?action=mpu-create")
        assert status == 429 and body["error"]["code"] == "quota_exceeded", body
        assert "BATCH_MAX_OPEN_UPLOADS" in body["error"]["message"]
        abort(stack, *opened.pop())
        opened.append(start_upload(stack))  # room again
    finally:
        for file_id, upload_id in opened:
            abort(stack, file_id, upload_id)


def test_parallel_parts_cannot_overfill_a_file(stack):
    """Parts sent at once each passed the size check (limit 4 MB, 7.5 MB stored)."""
    file_id, upload_id = start_upload(stack)
    try:
        part = b"x" * (MAX_FILE_BYTES * 6 // 10)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = sorted(pool.map(lambda n: put_part(stack, file_id, upload_id, n, part)[0], range(1, 5)))
        assert statuses == [200, 413, 413, 413], statuses
        held = sum(p.stat().st_size for p in (stack.run_dir / "batch" / "uploads" / file_id).iterdir())
        assert held <= MAX_FILE_BYTES
    finally:
        abort(stack, file_id, upload_id)


def test_the_batch_store_is_the_owners_only(stack):
    """Created 755/644 under umask 022: job inputs readable by every local user."""
    submit_job(stack, (TEXT_LINE + "\n").encode())
    root = stack.run_dir / "batch"
    loose = [f"{p} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in [root, *root.rglob("*")]
             if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose, loose


# ---------------------------------------------------------------- 6. LOW: the Host header
def test_result_urls_do_not_come_from_the_host_header(stack):
    done = wait_finished(stack, submit_job(stack, (TEXT_LINE + "\n").encode()))
    shown = job(stack, done["id"], headers={"Host": "evil.example"})
    assert shown["outputs"] and all(o["url"].startswith(f"/v1/batch/{done['id']}/results/") for o in shown["outputs"])


# ---------------------------------------------------------------- 5. MEDIUM: internal request ids
def test_a_client_request_id_cannot_pose_as_an_internal_one(stack):
    """An X-Request-ID starting with status- was failed like a status query: with the broker
    frozen, 504 after the whole REQUEST_TIMEOUT instead of 503 once heartbeats stop."""
    broker = stack.pid("broker")
    body = json.dumps({"question": "Say hi.", "settings": {"max_tokens": 2}}).encode()
    os.kill(broker, signal.SIGSTOP)
    try:
        outcomes = [call(stack, "POST", "/v1/query", body, {"X-Request-ID": rid}, timeout=60)
                    for rid in ("plain-1", "status-1")]
    finally:
        os.kill(broker, signal.SIGCONT)
    for status, answer, took in outcomes:
        assert status == 503 and took < 15, (status, answer, took)
    stack.wait_ready()


# ---------------------------------------------------------------- 4. MEDIUM: no silent open door
def run_config(**env) -> subprocess.CompletedProcess:
    """`python -m shared.sizes`, as scripts/serve.sh runs it before supervisord."""
    return subprocess.run([sys.executable, "-m", "shared.sizes"], env={**os.environ, "HOST": "127.0.0.1",
                          "VLM_API_KEY": "", "ALLOW_UNAUTHENTICATED": "", **env},
                          cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, words", [
    ({"HOST": "0.0.0.0"}, "set VLM_API_KEY"),
    ({"VLM_API_KEY": " "}, "VLM_API_KEY is only spaces"),
    ({"VLM_API_KEY": "key\n"}, "VLM_API_KEY has spaces or line breaks around it"),
    ({"PORT": "abc"}, "PORT='abc' is not a whole number"),
    ({"BATCH_SIZE": "-1"}, "BATCH_SIZE=-1 must be above 0"),
    ({"PORT": "70000"}, "PORT=70000 must be between 1 and 65535"),
    ({"REQUEST_TIMEOUT": "nan"}, "REQUEST_TIMEOUT=nan is not a finite number"),
    ({"STRICT_FIELDS": "tru"}, "STRICT_FIELDS='tru' is not true or false"),
])
def test_a_setting_that_cannot_work_is_one_line_and_exit_78(env, words):
    done = run_config(**env)
    assert done.returncode == 78 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr


@pytest.mark.parametrize("raw, value", [("1", True), ("TRUE", True), (" yes ", True), ("on", True),
                                        ("0", False), ("false", False), ("No", False), ("off", False)])
def test_boolean_settings_read_the_usual_words(monkeypatch, raw, value):
    for name, setting in {"HOST": "127.0.0.1", "VLM_API_KEY": "", "STRICT_FIELDS": raw}.items():
        monkeypatch.setenv(name, setting)
    assert load_config(exit_on_error=False).strict_fields is value


def test_open_doors_that_are_said_out_loud_start():
    assert run_config().returncode == 0  # loopback, no key
    assert run_config(HOST="0.0.0.0", VLM_API_KEY="k").returncode == 0
    assert run_config(HOST="0.0.0.0", ALLOW_UNAUTHENTICATED="1").returncode == 0


def test_the_front_end_refuses_all_addresses_without_a_key(tmp_path):
    env = stack_env(tmp_path, HOST="0.0.0.0", VLM_API_KEY="")
    group = ProcessGroup(env, tmp_path)
    try:
        front = group.start("frontend")
        assert front.wait(timeout=60) == 78
        assert "HOST=0.0.0.0 would serve other machines with no API key" in front.log_path.read_text()
    finally:
        group.stop_all()


def test_serving_everyone_on_purpose_is_said_on_the_terminal_and_in_health():
    with running_stack(HOST="0.0.0.0", ALLOW_UNAUTHENTICATED="1") as open_stack:
        code, health = open_stack.health()
        assert code == 200 and health["authentication"] == "no authentication" and not health["auth_required"]
        wait_for(lambda: "listening on" in open_stack.terminal(), 60, "the ready line", open_stack)
        assert "no authentication: anyone who can reach the port can use it" in open_stack.terminal()


# ---------------------------------------------------------------- 6. LOW: MAX_IN_FLIGHT across front ends
def test_the_in_flight_count_is_shared_between_processes(tmp_path):
    """Another process (a real one) holds 3 of the 4 slots: this one gets the last, then 429s."""
    path = tmp_path / "frontend-in-flight"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from frontend.edge import SharedInFlight; "
         f"c = SharedInFlight(4, {str(path)!r}, 1, 2); [c.try_acquire() for _ in range(3)]; "
         "print('held', flush=True); sys.stdin.readline(); c.release(); print('released', flush=True); sys.stdin.readline()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from frontend.edge import SharedInFlight

        count = SharedInFlight(4, str(path), 0, 2)
        assert count.try_acquire() and not count.try_acquire()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        assert count.try_acquire() and not count.try_acquire()
        count.release()
        count.release()
        assert count.total() == 2  # the other process's two
    finally:
        holder.kill()
        holder.wait()


def test_two_front_ends_take_the_whole_limit_however_connections_fall():
    """With FRONTEND_WORKERS=2 each front end counted to its own limit: the kernel's uneven spread
    of connections gave 429s below the documented total."""
    from tests.test_http_edge import start_long_streams

    with running_stack(FRONTEND_WORKERS=2, HTTP_THREADS=3) as two:  # the limit: 2 x 3 = 6 together
        warm_up(two)
        streams = start_long_streams(two, 6)  # asserts each one's 200
        try:
            status, body, took = call(two, "POST", "/v1/query", json.dumps({"question": "hi"}).encode())
            assert status == 429 and took < 5, (status, body, took)
        finally:
            for sock in streams:
                sock.close()
