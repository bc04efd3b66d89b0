"""Bulk jobs through the whole service under supervisord (the batch worker included).

One stack for the module, with an API key.  Expected answers come from the
engine run in this process on the same image bytes (decoded the way the
preprocess workers do), as in test_stack_e2e.py.  Jobs are small (at most 200
lines, 4 tokens each, the tiny test model) to keep the module at a few minutes
on a loaded 2-core machine; what they check does not depend on the size.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker_client.client import BrokerClient
from gpu_worker.engine_types import EngineRequest, ImageInput
from gpu_worker.scheduler import Scheduler
from preprocess_worker.worker import preprocess
from tests.engine_helpers import CONFORMANCE, fixture_engine, run_requests, sampling, skill_params
from tests.stack import REPO, running_stack, wait_for

pytestmark = pytest.mark.timeout(600)

KEY = "batch-test-key"
MAX_LINE_BYTES = 100_000
MAX_FILE_BYTES = 4_000_000
SETTINGS = {"temperature": 0, "max_tokens": 4}
REGION_SETTINGS = {**SETTINGS, "max_objects": 2}
IMAGES = ("small_96x64.png", "square_378.png", "gray_500x400.png")

# (skill, line fields without image, engine params); an image is added to each but the text-only query.
CASES = [
    ("caption", {"length": "short"}, {"length": "short"}),
    ("caption", {"length": "normal"}, {"length": "normal"}),
    ("query", {"question": "What is this?"}, {"question": "What is this?", "reasoning": False, "spatial_refs": []}),
    ("detect", {"object": "face"}, {"object": "face"}),
    ("point", {"object": "eye"}, {"object": "eye"}),
]
TEXT_ONLY = ("query", {"question": "Say hi."}, {"question": "Say hi.", "reasoning": False, "spatial_refs": []})


@functools.lru_cache(maxsize=None)
def image_bytes(name: str) -> bytes:
    return (REPO / CONFORMANCE / "main" / "images" / name).read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def stack():
    with running_stack(VLM_API_KEY=KEY, BATCH_IN_FLIGHT=8,
                       BATCH_MAX_LINE_BYTES=MAX_LINE_BYTES, BATCH_MAX_FILE_BYTES=MAX_FILE_BYTES, BATCH_MAX_LINES=250) as s:
        yield s


@pytest.fixture(scope="module")
def expected():
    """(skill, engine params, image name) -> the result the engine gives in this process."""
    scheduler = Scheduler(fixture_engine("main"), max_batch=1)

    @functools.lru_cache(maxsize=None)
    def run(skill: str, params_json: str, image_name):
        image = None
        if image_name:
            done = preprocess(image_bytes(image_name), 50_000_000, 16384)
            image = ImageInput(crops=done.crops, tiling=done.tiling, key=done.key)
        settings = REGION_SETTINGS if skill in ("detect", "point") else SETTINGS
        request = EngineRequest(request_id=uuid.uuid4().hex, skill=skill, params=skill_params(skill, json.loads(params_json)),
                                settings=sampling(settings), image=image)
        outcome = run_requests(scheduler, [request])[request.request_id]
        assert outcome.error is None, outcome.error
        result = dict(outcome.output)
        if result.get("reasoning", 0) is None:
            result.pop("reasoning")
        if outcome.finish_reason is not None:
            result["finish_reason"] = outcome.finish_reason
        return result

    return lambda skill, params, image_name: run(skill, json.dumps(params, sort_keys=True), image_name)


# ---------------------------------------------------------------- HTTP helpers
def call(stack, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
         content_type: str = "application/json") -> tuple[int, bytes]:
    headers = {"Content-Type": content_type} if body is not None else {}
    if key is not None:
        headers["X-Moondream-Auth"] = key
    req = urllib.request.Request(stack.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def call_json(stack, method: str, path: str, payload=None, expect: int = 200) -> dict:
    status, body = call(stack, method, path, json.dumps(payload).encode() if payload is not None else None)
    assert status == expect, body
    return json.loads(body)


def submit(stack, data: bytes, parts: int = 2) -> str:
    created = call_json(stack, "POST", "/v1/batch?action=mpu-create")
    file_id, upload_id = created["fileId"], created["uploadId"]
    size = max(1, -(-len(data) // parts))
    listed = []
    for n in range(parts):
        status, body = call(stack, "PUT", f"/v1/batch/{file_id}?action=mpu-uploadpart&uploadId={upload_id}&partNumber={n + 1}",
                            data[n * size:(n + 1) * size], content_type="application/octet-stream")
        assert status == 200, body
        listed.append({"partNumber": n + 1, "etag": json.loads(body)["etag"]})
    done = call_json(stack, "POST", f"/v1/batch/{file_id}?action=mpu-complete&uploadId={upload_id}", {"parts": listed})
    assert done["status"] == "chunking"
    return done["id"]


def wait_done(stack, job_id: str, timeout: float = 300.0) -> dict:
    wait_for(lambda: call_json(stack, "GET", f"/v1/batch/{job_id}")["status"] in ("completed", "failed", "cancelled"),
             timeout, f"job {job_id} to finish", stack)
    return call_json(stack, "GET", f"/v1/batch/{job_id}")


def download(stack, job: dict) -> list[dict]:
    rows = []
    for output in job["outputs"]:
        path = output["url"].removeprefix(stack.url)
        status, body = call(stack, "GET", path)
        assert status == 200, body
        rows += [json.loads(line) for line in body.splitlines()]
    return rows


def jsonl(lines: list) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def good_lines(count: int) -> list[tuple[dict, tuple]]:
    """`count` valid lines cycling through the cases and images: (line, (skill, params, image name))."""
    combos = [(skill, fields, params, image) for skill, fields, params in CASES for image in IMAGES]
    combos.append((*TEXT_ONLY, None))
    out = []
    for i in range(count):
        skill, fields, params, image = combos[i % len(combos)]
        line = {"id": f"line-{i}", "skill": skill, **fields,
                "settings": REGION_SETTINGS if skill in ("detect", "point") else SETTINGS}
        if image:
            line["image"] = b64(image_bytes(image))
        out.append((line, (skill, params, image)))
    return out


def assert_complete_and_right(rows: list[dict], lines: list[tuple[dict, tuple]], expected) -> None:
    """Every line exactly once, in order, each with the engine's own answer."""
    assert [r["line_index"] for r in rows] == list(range(len(lines)))
    for row, (line, key) in zip(rows, lines):
        assert row["id"] == line["id"]
        assert row["status"] == "ok", row
        assert row["result"] == expected(*key), row["line_index"]


@contextlib.contextmanager
def paused_mid_job(stack, job_id: str, total: int):
    """Freeze the GPU worker (SIGSTOP) once a few lines are done, so the job is
    certainly mid-way while the test checks it and kills a process; a fast
    machine finishes a small job between two polls otherwise.  SIGCONT on exit
    (a no-op on a process killed meanwhile)."""
    gpu_pid = stack.pid("gpu_worker")
    wait_for(lambda: call_json(stack, "GET", f"/v1/batch/{job_id}")["progress"]["completed"] >= 3, 120,
             "the job to be under way", stack)
    os.kill(gpu_pid, signal.SIGSTOP)
    try:
        job = call_json(stack, "GET", f"/v1/batch/{job_id}")
        assert job["status"] == "processing" and job["progress"]["completed"] < total, job  # frozen mid-job
        yield job
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(gpu_pid, signal.SIGCONT)


# ---------------------------------------------------------------- tests
def test_mixed_job_gives_each_line_the_engines_answer_or_its_error_code(stack, expected):
    photo = image_bytes("square_378.png")
    broken = {  # position -> (line, error code)
        7: ({"id": "bad-b64", "skill": "caption", "image": "not base64 at all!", "settings": SETTINGS}, "image_decode_failed"),
        23: ({"id": "bad-skill", "skill": "summarize", "image": b64(photo)}, "unknown_skill"),
        41: ({"id": "no-question", "skill": "query", "image": b64(photo), "settings": SETTINGS}, "invalid_request"),
        60: ({"id": "truncated", "skill": "caption", "image": b64(photo[:len(photo) // 2]), "settings": SETTINGS},
             "image_decode_failed"),
        77: ({"id": "oversized", "skill": "caption", "image": b64(b"x" * MAX_LINE_BYTES)}, "invalid_request"),
        95: ({"id": "two-images", "skill": "caption", "images": [b64(photo), b64(photo)]}, "invalid_request"),
        120: ({"id": "no-skill", "image": b64(photo)}, "invalid_request"),
        141: ({"id": "no-object", "skill": "detect", "image": b64(photo)}, "invalid_request"),
        163: ({"id": "bad-length", "skill": "caption", "image": b64(photo), "length": "epic"}, "invalid_request"),
        188: ({"id": "not-an-image", "skill": "point", "object": "x", "image": b64(b"hello world")}, "image_decode_failed"),
    }
    good = iter(good_lines(200 - len(broken)))
    lines = [broken[i][0] if i in broken else next(good) for i in range(200)]
    job_id = submit(stack, jsonl([line if i in broken else line[0] for i, line in enumerate(lines)]), parts=3)
    job = wait_done(stack, job_id)
    assert job["status"] == "completed"
    assert job["progress"] == {"total": 200, "completed": 190, "failed": 10}
    assert job["usage"]["output_tokens"] > 0
    rows = download(stack, job)
    assert [r["line_index"] for r in rows] == list(range(200))
    for i, row in enumerate(rows):
        if i in broken:
            line, code = broken[i]
            echoed = None if line["id"] == "oversized" else line["id"]  # an oversized line is never read
            assert (row["id"], row["status"], row["error"]["code"]) == (echoed, "error", code), row
        else:
            line, key = lines[i]
            assert (row["id"], row["status"]) == (line["id"], "ok"), row
            assert row["result"] == expected(*key), row
            assert row["usage"]["output_tokens"] >= 1


@pytest.mark.parametrize("program", ["batch_worker", "broker", "gpu_worker"])
def test_sigkill_during_a_job_loses_and_doubles_nothing(stack, expected, program):
    lines = good_lines(40)
    job_id = submit(stack, jsonl([line for line, _ in lines]))
    victim = stack.pid(program)
    with paused_mid_job(stack, job_id, len(lines)):
        os.kill(victim, signal.SIGKILL)
    job = wait_done(stack, job_id)
    assert job["status"] == "completed" and job["progress"] == {"total": 40, "completed": 40, "failed": 0}
    assert_complete_and_right(download(stack, job), lines, expected)
    stack.wait_ready(60)


def test_supervisord_restart_during_a_job_loses_and_doubles_nothing(stack, expected):
    lines = good_lines(40)
    job_id = submit(stack, jsonl([line for line, _ in lines]))
    with paused_mid_job(stack, job_id, len(lines)):
        stack.process.send_signal(signal.SIGTERM)  # supervisord stops every program, the job with it
    stack.stop()  # waits for supervisord to exit
    stack.process = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-c", str(REPO / "supervisord.conf")],
                                     env=stack.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
    stack.wait_ready(90)
    job = wait_done(stack, job_id)
    assert job["status"] == "completed"
    assert_complete_and_right(download(stack, job), lines, expected)


@pytest.mark.parametrize("data, code", [
    (b'{"skill": "caption"}\n\n{"skill": "caption"}\n', "validation_error"),
    (b'{"skill": "caption", "id": "\xc3\x28"}\n', "validation_error"),
    (b'{"skill": "caption", \n', "validation_error"),
    (b"\n", "empty_batch"),  # blank lines at the end are ignored (issue 22): no lines left
    (b"", "empty_batch"),
    (b'{"skill": "query"}\n' * 251, "limit_exceeded"),
])
def test_malformed_files_fail_with_their_batch_level_error(stack, data, code):
    job = wait_done(stack, submit(stack, data, parts=1), timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == code
    assert job["progress"]["completed"] == job["progress"]["failed"] == 0


def test_upload_mistakes_get_clear_errors(stack):
    created = call_json(stack, "POST", "/v1/batch?action=mpu-create")
    file_id, upload_id = created["fileId"], created["uploadId"]
    part = f"/v1/batch/{file_id}?action=mpu-uploadpart&uploadId={upload_id}&partNumber="
    status, body = call(stack, "PUT", part + "1", b"x" * (MAX_FILE_BYTES // 2 + 1), content_type="application/octet-stream")
    assert status == 200
    etag = json.loads(body)["etag"]
    status, body = call(stack, "PUT", part + "2", b"x" * (MAX_FILE_BYTES // 2 + 1), content_type="application/octet-stream")
    assert status == 413 and json.loads(body)["error"]["code"] == "limit_exceeded"
    complete = f"/v1/batch/{file_id}?action=mpu-complete&uploadId={upload_id}"
    assert call(stack, "POST", complete, b'{"parts": [{"partNumber": 1, "etag": "00"}]}')[0] == 400
    assert call(stack, "POST", complete, b'{"parts": "no"}')[0] == 400
    assert call(stack, "POST", complete, b"not json")[0] == 400
    assert call(stack, "POST", f"/v1/batch/{file_id}?action=mpu-complete&uploadId={'0' * 32}",
                json.dumps({"parts": [{"partNumber": 1, "etag": etag}]}).encode())[0] == 404
    assert call(stack, "POST", f"/v1/batch/{file_id}?action=explode&uploadId={upload_id}", b"{}")[0] == 400
    assert call(stack, "DELETE", f"/v1/batch/{file_id}?action=mpu-abort&uploadId={upload_id}")[0] == 200
    assert call(stack, "PUT", part + "1", b"x", content_type="application/octet-stream")[0] == 404  # aborted
    assert call(stack, "GET", "/v1/batch/..%2F..%2Fetc")[0] == 404
    assert call(stack, "GET", f"/v1/batch/{'0' * 32}")[0] == 404


def test_every_batch_route_needs_the_key(stack):
    some_id = uuid.uuid4().hex
    routes = [("POST", "/v1/batch?action=mpu-create"), ("GET", "/v1/batch"), ("GET", f"/v1/batch/{some_id}"),
              ("PUT", f"/v1/batch/{some_id}?action=mpu-uploadpart&uploadId=x&partNumber=1"),
              ("POST", f"/v1/batch/{some_id}?action=mpu-complete&uploadId=x"),
              ("DELETE", f"/v1/batch/{some_id}?action=mpu-abort&uploadId=x"),
              ("POST", f"/v1/batch/{some_id}/cancel"), ("GET", f"/v1/batch/{some_id}/results/0")]
    for method, path in routes:
        for key in (None, "wrong-key"):
            status, body = call(stack, method, path, b"{}" if method in ("POST", "PUT") else None, key=key)
            assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized", (method, path, key)


def background_at_broker(client: BrokerClient) -> int:
    """Batch lines the broker holds now (queued or at a GPU worker); -1 while it does not answer."""
    status = client.status(1.0)
    return -1 if status is None else status.background


def test_cancel_stops_the_remaining_lines(stack):
    lines = good_lines(40)
    job_id = submit(stack, jsonl([line for line, _ in lines]))
    client = BrokerClient(stack.config)
    try:
        with paused_mid_job(stack, job_id, len(lines)):
            assert call_json(stack, "POST", f"/v1/batch/{job_id}/cancel")["status"] == "cancelled"
        # the lines in flight at the cancel are stopped: none is left at the broker
        wait_for(lambda: background_at_broker(client) == 0, 60, "the cancelled job's lines to stop", stack)
    finally:
        client.close()
    job = call_json(stack, "GET", f"/v1/batch/{job_id}")
    done = job["progress"]["completed"] + job["progress"]["failed"]
    assert job["status"] == "cancelled" and done < 40
    rows = download(stack, job) if job["outputs"] else []
    assert len(rows) == done and len({r["line_index"] for r in rows}) == done


def test_interactive_requests_are_answered_while_a_job_keeps_its_lines_in_flight(stack):
    """The batch worker only marks its lines BACKGROUND: it keeps BATCH_IN_FLIGHT of them at the
    broker under interactive load (no narrowing, no Status polling), the broker and the GPU
    worker's scheduler let the interactive requests through, and the job keeps moving."""
    lines = good_lines(240)  # more than it can finish meanwhile (cancelled at the end)
    job_id = submit(stack, jsonl([line for line, _ in lines]))
    wait_for(lambda: call_json(stack, "GET", f"/v1/batch/{job_id}")["progress"]["completed"] >= 1, 120,
             "the job to be under way", stack)
    query = json.dumps({"question": "Say hi.", "settings": {**SETTINGS, "max_tokens": 48}}).encode()
    done = threading.Event()
    statuses = []

    def interactive_load() -> None:
        end = time.monotonic() + 90
        while not done.is_set() and time.monotonic() < end:
            status, _ = call(stack, "POST", "/v1/query", query)
            statuses.append(status)

    threads = [threading.Thread(target=interactive_load) for _ in range(3)]
    for t in threads:
        t.start()
    client = BrokerClient(stack.config)
    try:
        wait_for(lambda: len(statuses) >= 3, 90, "interactive answers while the job runs", stack)
        completed = call_json(stack, "GET", f"/v1/batch/{job_id}")["progress"]["completed"]
        # all 8 lines (BATCH_IN_FLIGHT) at the broker while interactive requests run
        wait_for(lambda: background_at_broker(client) == 8, 30, "the job's 8 lines at the broker", stack)
        wait_for(lambda: call_json(stack, "GET", f"/v1/batch/{job_id}")["progress"]["completed"] > completed,
                 90, "the job to keep moving under interactive load", stack)
    finally:
        done.set()
        client.close()
        for t in threads:
            t.join(timeout=120)
    assert statuses and set(statuses) == {200}  # interactive requests are answered while the job runs
    assert call_json(stack, "POST", f"/v1/batch/{job_id}/cancel")["status"] == "cancelled"


def test_metrics_and_health_show_the_jobs(stack):
    jobs = call_json(stack, "GET", "/v1/batch?limit=100")
    assert not jobs["has_more"] and jobs["data"], jobs  # the jobs of the tests above, all of them
    status, body = call(stack, "GET", "/metrics", key=None)
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(body.decode()) for sample in family.samples}
    for state in ("chunking", "processing", "completed", "failed", "cancelled"):
        expected = sum(job["status"] == state for job in jobs["data"])
        assert samples[("moondream_batch_jobs", (("status", state),))] == expected, state
    assert samples[("moondream_batch_lines", (("status", "ok"),))] == sum(j["progress"]["completed"] for j in jobs["data"])
    assert samples[("moondream_batch_lines", (("status", "error"),))] == sum(j["progress"]["failed"] for j in jobs["data"])
    waiting = sum(j["progress"]["total"] - j["progress"]["completed"] - j["progress"]["failed"]
                  for j in jobs["data"] if j["status"] == "processing")
    assert samples[("moondream_batch_lines_waiting", ())] == waiting
    code, health = stack.health()
    assert health["batch"]["jobs_running"] == sum(j["status"] in ("processing", "chunking") for j in jobs["data"])


def test_cli_runs_a_job_end_to_end(stack, expected, tmp_path):
    lines = good_lines(12)
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([line for line, _ in lines]))
    env = {**os.environ, "MOONDREAM_ENDPOINT": stack.url, "MOONDREAM_API_KEY": KEY}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "batch_cli", *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "out.jsonl"
    run = cli("submit", str(source), "--wait", "--interval", "0.3", "--part-mb", "0.02", "-o", str(out))
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    assert "line/s" in run.stderr or "s/line" in run.stderr  # the progress bar's rate
    assert "completed: 12 ok, 0 failed of 12" in run.stderr
    assert_complete_and_right([json.loads(x) for x in out.read_text().splitlines()], lines, expected)
    assert json.loads(cli("status", job_id).stdout)["status"] == "completed"
    assert job_id in cli("list").stdout
    again = tmp_path / "again.jsonl"
    assert cli("download", job_id, "-o", str(again)).returncode == 0
    assert again.read_bytes() == out.read_bytes()
    assert cli("cancel", job_id).stdout.strip() == "completed"  # a finished job stays finished
    bad = subprocess.run([sys.executable, "-m", "batch_cli", "--api-key", "wrong", "--endpoint", stack.url, "list"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "401" in bad.stderr


# ---------------------------------------------------------------- by hand: curl, as the README shows
def readme_walkthrough() -> str:
    """The shell block under the README's batch-walkthrough marker, as written."""
    readme = (REPO / "README.md").read_text()
    after = readme.split("<!-- batch-walkthrough", 1)[1]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_readme_batch_walkthrough_runs_as_written(stack, expected, tmp_path):
    lines = good_lines(3)
    (tmp_path / "captions.jsonl").write_bytes(jsonl([line for line, _ in lines]))
    script = readme_walkthrough().replace("http://localhost:5000", stack.url)  # the stack's port: the one change
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VLM_API_KEY": KEY})
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)  # step 4's last curl: the finished job
    assert job["status"] == "completed" and job["progress"] == {"total": 3, "completed": 3, "failed": 0}, job
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert_complete_and_right(rows, lines, expected)


def test_curl_form_upload_is_a_one_shot_job(stack, expected, tmp_path):
    lines = good_lines(2)
    source = tmp_path / "x.jsonl"
    source.write_bytes(jsonl([line for line, _ in lines]))
    done = subprocess.run(["curl", "-sS", "-H", f"X-Moondream-Auth: {KEY}", "-F", f"file=@{source}",
                           stack.url + "/v1/batch"], capture_output=True, text=True, timeout=60)
    created = json.loads(done.stdout)
    assert created["status"] == "chunking", created
    assert_complete_and_right(download(stack, wait_done(stack, created["id"])), lines, expected)


def test_posting_without_action_or_a_form_says_how_to_upload(stack):
    status, body = call(stack, "POST", "/v1/batch", b"{}")
    error = json.loads(body)["error"]
    assert status == 400 and "mpu-create" in error["message"] and "curl -F file=@batch.jsonl" in error["message"]
    boundary = "x" * 16  # a form without the `file` part
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\n1\r\n--{boundary}--\r\n").encode()
    status, body = call(stack, "POST", "/v1/batch", form, content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 400 and "the part named `file`" in json.loads(body)["error"]["message"]


def test_a_job_that_failed_as_a_whole_says_why_in_the_cli(stack, tmp_path):
    job_id = submit(stack, b'{"skill": "caption", \n', parts=1)
    job = wait_done(stack, job_id, timeout=60)
    assert job["status"] == "failed"
    env = {**os.environ, "MOONDREAM_ENDPOINT": stack.url, "MOONDREAM_API_KEY": KEY}
    status = subprocess.run([sys.executable, "-m", "batch_cli", "status", job_id], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)["error"] == job["error"]
    assert status.stderr.strip() == f"failed: 0 ok, 0 failed of 0 (validation_error: {job['error']['message']})"
    listed = subprocess.run([sys.executable, "-m", "batch_cli", "list"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60).stdout
    row = next(line for line in listed.splitlines() if line.startswith(job_id))
    assert row.endswith(f"validation_error: {job['error']['message']}"), row


# ---------------------------------------------------------------- the light client install
# Run with these imports made impossible: what the client must do without (the server's stack).
WITHOUT_SERVER_DEPS = "import sys; sys.modules.update(dict.fromkeys(['torch', 'transformers', 'numpy', 'zmq', 'falcon']))"


def test_the_batch_cli_package_of_its_own_needs_no_server_dependencies(stack, tmp_path):
    """`pip install ./clients/batch`: a wheel of batch_cli alone, needing tqdm only, that runs a job."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(REPO / "clients/batch")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    shutil.rmtree(REPO / "clients/batch/build", ignore_errors=True)  # setuptools' leftovers (ignored by git anyway)
    for leftover in (REPO / "clients/batch").glob("*.egg-info"):
        shutil.rmtree(leftover, ignore_errors=True)
    (wheel,) = (tmp_path / "wheel").glob("moondream_batch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"batch_cli"}
    assert [line for line in metadata.splitlines() if line.startswith("Requires-Dist")] == ["Requires-Dist: tqdm>=4.66"]
    assert "moondream-batch = batch_cli.cli:main" in entry_points

    # Run from the wheel alone (zip import), the server's packages out of reach, against the stack.
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([line for line, _ in good_lines(2)]))
    code = (f"{WITHOUT_SERVER_DEPS}; sys.path.insert(0, {str(wheel)!r}); from batch_cli.cli import main; "
            f"sys.exit(main(['submit', {str(source)!r}, '--wait', '--interval', '0.3']))")
    run = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "MOONDREAM_ENDPOINT": stack.url, "MOONDREAM_API_KEY": KEY})
    assert run.returncode == 0, run.stderr
    assert "completed: 2 ok, 0 failed of 2" in run.stderr
