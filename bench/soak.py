"""Soak test: minutes of mixed load while random processes are SIGKILLed.

    .venv/bin/python -m bench.soak --duration 180 --concurrency 12 --kills 8

Starts the whole stack under supervisord on free ports (tests/stack.py) with the
tiny test model, or uses a running one (--url, plus --run-dir to be able to kill
its processes through supervisorctl).  Client threads send a mix of caption,
query, detect and point requests (some streamed) over loopback; meanwhile a
killer thread SIGKILLs a random process (broker, GPU worker, a preprocess
worker, the front end) at regular intervals.  Every request is classified:

    answered    200 with the expected answer (complete body, or complete stream)
    errored     a clean error: JSON 4xx/5xx, or a stream ending with an error event
                (errored_with_no_fault_open: those not overlapping any kill-to-recovery window)
    dropped     the connection broke while the front end was being killed (allowed)
    refused     no connection: the front end was restarting (nothing was sent)
    lost        no answer: a hang, or a broken connection with the front end alive
    misrouted   a 200 whose answer is not this request's (another request's, or garbage)
    unclean     an error that is not our JSON shape

`lost`, `misrouted` and `unclean` must be 0.  Expected answers come from running
the engine in this process on the same inputs, greedily (temperature 0), so each
request's right answer is known exactly.

The request helpers (`CASES`, `send`, `expected_answers`, `run_load`) are also
used by tests/test_faults.py.
"""
from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import functools
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
IMAGE_DIR = REPO / "tests/conformance/main/images"
SETTINGS = {"temperature": 0, "max_tokens": 8, "max_objects": 3}


@dataclasses.dataclass(frozen=True)
class Case:
    """One API request whose answer is known in advance."""

    skill: str
    params: tuple  # ((name, value), ...): hashable
    image: Optional[str]  # file name in IMAGE_DIR, or None (text-only query)
    stream: bool = False

    def body(self) -> dict:
        body = {**dict(self.params), "settings": SETTINGS}
        if self.image:
            body["image_url"] = _data_url(self.image)
        if self.stream:
            body["stream"] = True
        return body

    @property
    def answer_key(self) -> str:
        return {"caption": "caption", "query": "answer", "detect": "objects", "point": "points"}[self.skill]


@functools.lru_cache(maxsize=None)
def _data_url(image: str) -> str:
    return "data:image/png;base64," + base64.b64encode((IMAGE_DIR / image).read_bytes()).decode()


def _case(skill, image=None, stream=False, **params) -> Case:
    return Case(skill, tuple(sorted(params.items())), image, stream)


# Images with few crops keep the in-process expectations and the CPU stack quick.
# On the random-weight test model, text about an image is much the same whatever
# the image; text-only questions and detect/point answers differ from case to
# case, so those are what catches a misrouted answer (see distinguishable()).
CASES = [
    _case("caption", "small_96x64.png", length="short"),
    _case("caption", "square_378.png", stream=True, length="short"),
    _case("caption", "gray_500x400.png", length="normal"),
    _case("query", "square_378.png", stream=True, question="Which colour is it?"),
    _case("query", "gray_500x400.png", question="Is it grey?"),
    _case("query", None, question="Hi"),
    _case("query", None, stream=True, question="Why is the sky blue?"),
    _case("query", None, question="Name a colour."),
    _case("query", None, stream=True, question="tell me a story about a cat"),
    _case("query", None, question="What?"),
    _case("detect", "small_96x64.png", object="face"),
    _case("detect", "square_378.png", object="dog"),
    _case("point", "small_96x64.png", object="hand"),
    _case("point", "gray_500x400.png", object="sun"),
]


PROBE = CASES[0]  # an image caption: goes through every process type


def distinguishable(expected: dict) -> int:
    """How many cases have an answer no other case has (a misrouted reply to one of
    these is always caught)."""
    counts = collections.Counter(json.dumps(a) for a in expected.values())
    return sum(counts[json.dumps(a)] == 1 for a in expected.values())


def expected_answers(cases: list[Case]) -> dict[Case, object]:
    """Each case's answer from the test model (tests/conformance/main) run in this
    process, greedily, so exactly what the stack must answer."""
    from gpu_worker.engine_types import EngineRequest, ImageInput
    from gpu_worker.scheduler import Scheduler
    from preprocess_worker.worker import preprocess
    from tests.engine_helpers import fixture_engine, run_requests, sampling, skill_params

    scheduler = Scheduler(fixture_engine("main"), max_batch=len(cases))
    requests = {}
    for case in cases:
        image = None
        if case.image:  # exactly what the preprocess workers make of the same bytes
            done = preprocess((IMAGE_DIR / case.image).read_bytes(), 50_000_000, 16384)
            image = ImageInput(crops=done.crops, tiling=done.tiling, key=done.key)
        requests[case] = EngineRequest(request_id=uuid.uuid4().hex, skill=case.skill, params=skill_params(case.skill, dict(case.params)),
                                       settings=sampling(SETTINGS), image=image)
    outcomes = run_requests(scheduler, list(requests.values()))
    answers = {}
    for case, request in requests.items():
        outcome = outcomes[request.request_id]
        assert outcome.error is None, (case, outcome.error)
        answers[case] = outcome.output[case.answer_key]
    return answers


# ---------------------------------------------------------------- one request
@dataclasses.dataclass
class Reply:
    """What one HTTP request got back."""

    case: Case
    kind: str  # "ok" | "error" | "dropped" | "refused" | "hang" | "unclean"
    status: Optional[int] = None
    code: str = ""  # error code for "error"
    answer: object = None  # for "ok": the caption / answer / objects / points
    detail: str = ""
    started: float = 0.0  # time.monotonic()
    ended: float = 0.0


def send(base_url: str, case: Case, timeout: float, api_key: Optional[str] = None,
         extra_headers: Optional[dict] = None) -> Reply:
    """POST one case and classify the reply.  `timeout` bounds every socket
    operation and the whole exchange: past it, the request counts as a hang."""
    url = urllib.parse.urlsplit(base_url)
    reply = Reply(case, "hang", started=time.monotonic())
    body = json.dumps(case.body()).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-Moondream-Auth"] = api_key
    headers.update(extra_headers or {})
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError as exc:
            reply.kind, reply.detail = "refused", str(exc)
            return reply
        conn.request("POST", f"/v1/{case.skill}", body, headers)
        resp = conn.getresponse()
        reply.status = resp.status
        if resp.status == 200 and case.stream:
            _read_stream(resp, reply, reply.started + timeout)
        else:
            _read_json(resp, reply)
    except socket.timeout as exc:
        reply.kind, reply.detail = "hang", f"no answer within {timeout} s ({exc})"
    except (ConnectionError, http.client.HTTPException, OSError) as exc:
        reply.kind, reply.detail = "dropped", f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        reply.ended = time.monotonic()
    if reply.kind != "hang" and reply.ended - reply.started > timeout:
        reply.kind, reply.detail = "hang", f"took {reply.ended - reply.started:.1f} s (> {timeout} s)"
    return reply


def _read_json(resp: http.client.HTTPResponse, reply: Reply) -> None:
    raw = resp.read()
    try:
        body = json.loads(raw)
    except ValueError:
        reply.kind, reply.detail = "unclean", f"{resp.status} not JSON: {raw[:200]!r}"
        return
    if resp.status == 200:
        if not isinstance(body, dict) or reply.case.answer_key not in body:
            reply.kind, reply.detail = "unclean", f"200 without {reply.case.answer_key}: {raw[:200]!r}"
            return
        reply.kind, reply.answer = "ok", body[reply.case.answer_key]
    elif isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("code"):
        reply.kind, reply.code, reply.detail = "error", body["error"]["code"], body["error"].get("message", "")
    else:
        reply.kind, reply.detail = "unclean", f"{resp.status} without an error object: {raw[:200]!r}"


def _read_stream(resp: http.client.HTTPResponse, reply: Reply, give_up_at: float) -> None:
    """SSE: chunks, then exactly one final event (completed: true), then the end."""
    text, final = [], None
    while True:
        if time.monotonic() > give_up_at:
            reply.kind, reply.detail = "hang", "stream still open at the time limit"
            return
        line = resp.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[len(b"data: "):])
        if final is not None:
            reply.kind, reply.detail = "unclean", f"event after the final one: {event}"
            return
        if event.get("completed"):
            final = event
        else:
            text.append(event.get("chunk", ""))
    if final is None:
        reply.kind, reply.detail = "dropped", f"stream ended without a final event after {len(text)} chunks"
    elif "error" in final:
        reply.kind, reply.status = "error", final["error"].get("status")
        reply.code, reply.detail = final["error"].get("code", ""), final["error"].get("message", "")
    else:
        reply.kind, reply.answer = "ok", "".join(text)


# ---------------------------------------------------------------- load
def run_load(base_url: str, cases: list[Case], threads: int, seconds: float, timeout: float,
             seed: int = 0, during: Optional[Callable[[], None]] = None, api_key: Optional[str] = None) -> list[Reply]:
    """`threads` clients send random cases back to back for `seconds`; `during()`
    runs meanwhile on this thread (it injects the faults).  Returns every Reply."""
    stop_at = time.monotonic() + seconds
    replies: list[Reply] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while time.monotonic() < stop_at:
            reply = send(base_url, rng.choice(cases), timeout, api_key)
            with lock:
                replies.append(reply)
            if reply.kind in ("refused", "dropped"):
                time.sleep(0.2)  # the front end is restarting: don't spin

    workers = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(threads)]
    for w in workers:
        w.start()
    try:
        if during is not None:
            during()
    finally:
        for w in workers:
            w.join(timeout=max(0.0, stop_at - time.monotonic()) + timeout + 5)
    assert not any(w.is_alive() for w in workers), "a client thread is stuck past every timeout"
    return replies


def misrouted(reply: Reply, expected: dict) -> bool:
    """A 200 whose answer is not the one this request must get."""
    return reply.answer != expected[reply.case]


# ---------------------------------------------------------------- supervisord
PROGRAMS = ("broker", "gpu_worker", "preprocess:preprocess_00", "preprocess:preprocess_01", "frontend:frontend_00")


class Supervisor:
    """supervisorctl against the supervisord of `run_dir` (its control socket lives there)."""

    def __init__(self, run_dir: str, env: Optional[dict] = None):
        self.env = {**(env or os.environ), "RUN_DIR": run_dir}

    def ctl(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(REPO / "supervisord.conf"), *args],
                              env=self.env, cwd=REPO, capture_output=True, text=True, timeout=60).stdout

    def pid(self, name: str) -> int:
        try:
            return int(self.ctl("pid", name).strip() or 0)
        except ValueError:
            return 0

    def states(self) -> dict[str, str]:
        return {p[0]: p[1] for p in (line.split() for line in self.ctl("status").splitlines()) if len(p) >= 2}


# ---------------------------------------------------------------- the soak
def soak(base_url: str, supervisor: Optional[Supervisor], duration: float, concurrency: int, kills: int,
         seed: int, timeout: float, expected: dict) -> dict:
    rng = random.Random(seed)
    killed: list[tuple[float, float, float, str]] = []  # (killed at, restarted at, serving at, program)

    def killer() -> None:
        if supervisor is None or kills == 0:
            return
        start = time.monotonic()
        gap = duration / (kills + 1)
        for n in range(kills):
            wait = start + gap * (n + 1) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            name = rng.choice(PROGRAMS)
            pid = supervisor.pid(name)
            if pid <= 0:
                print(f"  skip {name}: not running", flush=True)
                continue
            os.kill(pid, signal.SIGKILL)
            at = time.monotonic()
            restarted, back = _wait_back(supervisor, name, pid, base_url, deadline=at + 60)
            killed.append((at, restarted, back, name))
            print(f"  t={at - start:6.1f} s  SIGKILL {name} (pid {pid}): RUNNING again after {restarted - at:.1f} s, "
                  f"a probe request answered after {back - at:.1f} s", flush=True)

    print(f"soak: {duration:.0f} s, {concurrency} clients, {kills} kills, against {base_url}", flush=True)
    replies = run_load(base_url, CASES, concurrency, duration, timeout, seed=seed, during=killer)
    return report(replies, killed, expected)


def _wait_back(supervisor: Supervisor, name: str, old_pid: int, base_url: str, deadline: float) -> tuple[float, float]:
    """(when supervisord has the program RUNNING under a new pid, when a probe
    request through every process type is answered 200 again)."""
    restarted = float("nan")
    while time.monotonic() < deadline:
        if restarted != restarted:  # nan: not restarted yet
            if supervisor.pid(name) not in (0, old_pid) and supervisor.states().get(name) == "RUNNING":
                restarted = time.monotonic()
        if send(base_url, PROBE, timeout=30).kind == "ok" and restarted == restarted:
            return restarted, time.monotonic()
        time.sleep(0.2)
    return restarted, float("nan")


def _health(base_url: str) -> int:
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def report(replies: list[Reply], killed: list, expected: dict) -> dict:
    """Count the replies by outcome; a broken connection counts as lost unless
    the front end was killed while the request was open."""
    frontend_down = [(at, back) for at, _, back, name in killed if name == "frontend:frontend_00"]
    counts = collections.Counter()
    errors = collections.Counter()
    examples = collections.defaultdict(list)
    outside = 0
    for r in replies:
        if r.kind == "ok":
            kind = "misrouted" if misrouted(r, expected) else "answered"
        elif r.kind == "error":
            kind = "errored"
            errors[f"{r.status} {r.code}"] += 1
            if not any(r.ended >= at - 1 and r.started <= back + 1 for at, _, back, _ in killed):
                outside += 1  # an error while every process was up: not the price of a fault
        elif r.kind == "dropped":
            kind = "dropped" if any(r.started - 1 <= at <= r.ended + 1 for at, _ in frontend_down) else "lost"
        elif r.kind == "hang":
            kind = "lost"
        else:
            kind = r.kind  # refused, unclean
        counts[kind] += 1
        if len(examples[kind]) < 3 and kind in ("lost", "misrouted", "unclean"):
            examples[kind].append(f"{r.case.skill} stream={r.case.stream}: {r.detail or r.answer}")
    sent = sum(counts[k] for k in counts if k != "refused")
    return {
        "distinguishable_cases": f"{distinguishable(expected)} of {len(expected)}",
        "sent": sent,
        **{k: counts[k] for k in ("answered", "errored", "dropped", "refused", "lost", "misrouted", "unclean")},
        "errors_by_status": dict(errors.most_common()),
        "errored_with_no_fault_open": outside,
        "kills": [{"program": name, "running_again_after_s": round(restarted - at, 1),
                   "serving_again_after_s": round(back - at, 1)} for at, restarted, back, name in killed],
        "examples": {k: v for k, v in examples.items() if v},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=12, help="client threads")
    parser.add_argument("--kills", type=int, default=8, help="SIGKILLs, evenly spread over the duration")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60, help="seconds without an answer that count as lost")
    parser.add_argument("--url", help="a running stack's base URL (default: start one); it must serve the "
                        "test model (MOONDREAM_MODEL=tests/conformance/main) for the answers to be checked")
    parser.add_argument("--run-dir", help="with --url: its RUN_DIR, so processes can be killed via supervisorctl")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args(argv)

    for host in [urllib.parse.urlsplit(args.url).hostname] if args.url else []:
        if host not in ("127.0.0.1", "localhost", "::1"):
            parser.error("the soak kills processes and hammers the server: loopback URLs only")

    print("expected answers from the engine in-process ...", flush=True)
    expected = expected_answers(CASES)
    if args.url:
        supervisor = Supervisor(args.run_dir) if args.run_dir else None
        result = soak(args.url, supervisor, args.duration, args.concurrency, args.kills if supervisor else 0,
                      args.seed, args.timeout, expected)
    else:
        from tests.stack import running_stack

        # A request deadline well under the client's timeout: a hang is a bug, not a slow answer.
        with running_stack(REQUEST_TIMEOUT=max(5.0, args.timeout / 2)) as stack:
            result = soak(stack.url, Supervisor(str(stack.run_dir), stack.env), args.duration, args.concurrency,
                          args.kills, args.seed, args.timeout, expected)
            time.sleep(3)
            result["final_states"] = stack.states()
            result["final_health"] = stack.health()[0]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
