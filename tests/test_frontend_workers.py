"""Several front-end processes on one port (FRONTEND_WORKERS, frontend/listen.py), and the host sizing.

Under real supervisord: two front ends both get connections on PORT, and a SIGKILL of one loses
no request of the other (requests on the connections it holds all succeed; supervisord restarts
the killed one).  Standalone: a front end of another deployment cannot join the port (exit 78),
one of the same deployment can.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.config import EXIT_CONFIG
from tests.stack import ProcessGroup, running_stack, stack_env, wait_for

pytestmark = pytest.mark.timeout(240)

QUERY = json.dumps({"question": "What is it?", "settings": {"max_tokens": 3}}).encode()
MAX_CONNECTIONS = 60  # tries to find a connection on each process (the kernel hashes new connections)


def get(conn: http.client.HTTPConnection, path: str) -> int:
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def query(conn: http.client.HTTPConnection) -> int:
    conn.request("POST", "/v1/query", QUERY, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def queries_answered(stack) -> float:
    """moondream_http_requests_total of POST /v1/query 200, from a scrape on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "moondream_http_requests_total"
               and sample.labels == {"route": "/v1/query", "method": "POST", "status": "200"})


def connections_by_process(stack, names: tuple[str, ...], tag: str) -> dict[str, list[http.client.HTTPConnection]]:
    """Open keep-alive connections until each front end holds at least one; which one a connection
    reached is told by its front end's access log (a request for a path only it was sent)."""
    found: dict[str, list] = {name: [] for name in names}
    for k in range(MAX_CONNECTIONS):
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
        path = f"/{tag}-{k}-"
        assert get(conn, path) == 404
        wait_for(lambda: any(path in stack.log(name) for name in names), 10, f"the access log line of {path}")
        found[next(name for name in names if path in stack.log(name))].append(conn)
        if all(found.values()):
            return found
    raise AssertionError(f"after {MAX_CONNECTIONS} connections, some front end got none: "
                         f"{ {name: len(conns) for name, conns in found.items()} }")


def test_two_front_ends_share_the_port_and_a_sigkill_of_one_loses_nothing_of_the_other():
    names = ("frontend_00", "frontend_01")
    with running_stack(preprocess_workers=1, FRONTEND_WORKERS=2) as stack:
        wait_for(lambda: {stack.states().get(f"frontend:{name}") for name in names} == {"RUNNING"}, 60,
                 "both front ends RUNNING", stack)
        pids = {name: stack.pid(f"frontend:{name}") for name in names}
        assert len(set(pids.values())) == 2
        conns = connections_by_process(stack, names, "which")  # both get traffic
        survivors = conns["frontend_01"]
        assert query(conns["frontend_00"][0]) == 200  # one answer from the one to be killed
        try:
            statuses: list[int] = []
            errors: list[BaseException] = []
            started = threading.Barrier(len(survivors) + 1)

            def load(conn: http.client.HTTPConnection) -> None:
                started.wait()
                try:
                    for _ in range(6):
                        statuses.append(query(conn))
                except BaseException as exc:  # a broken connection would be a lost request
                    errors.append(exc)

            threads = [threading.Thread(target=load, args=(conn,)) for conn in survivors]
            for thread in threads:
                thread.start()
            started.wait()
            os.kill(pids["frontend_00"], signal.SIGKILL)
            for thread in threads:
                thread.join(timeout=180)
            assert not any(thread.is_alive() for thread in threads), "a request on the surviving front end hangs"
            assert not errors, errors
            assert statuses == [200] * (6 * len(survivors)), statuses
            # supervisord restarts the killed one; both serve again, the survivor was left alone.
            wait_for(lambda: stack.pid("frontend:frontend_00") not in (0, pids["frontend_00"]), 60,
                     "a new frontend_00", stack)
            wait_for(lambda: stack.states().get("frontend:frontend_00") == "RUNNING", 60, "frontend_00 RUNNING", stack)
            assert stack.pid("frontend:frontend_01") == pids["frontend_01"]
            connections_by_process(stack, names, "again")
            # /metrics of any front end counts every one's answers, the killed one's included.
            answered = 1 + len(statuses)
            for _ in range(4):
                assert queries_answered(stack) == answered
        finally:
            for conn in (c for group in conns.values() for c in group):
                conn.close()


def test_a_front_end_of_another_deployment_cannot_join_the_port(tmp_path):
    env = stack_env(tmp_path, FRONTEND_WORKERS=2, DEPLOYMENT_ID="first")
    group = ProcessGroup(env, tmp_path)
    try:
        first = group.start("frontend", "first")
        wait_for(lambda: get(http.client.HTTPConnection("127.0.0.1", int(env["PORT"]), timeout=5), "/health/live") == 200,
                 30, "the first front end")
        sibling = group.start("frontend", "sibling")  # same deployment: shares the port
        stranger = group.start("frontend", "stranger", DEPLOYMENT_ID="second")
        assert stranger.wait(timeout=60) == EXIT_CONFIG
        log = stranger.log_path.read_text()
        assert f"cannot listen on HOST=127.0.0.1 PORT={env['PORT']}" in log and "another deployment ('first'" in log, log
        assert "Traceback" not in log
        wait_for(lambda: "Serving on" in sibling.log_path.read_text(), 30, "the sibling to listen")
        assert first.poll() is None and sibling.poll() is None
    finally:
        group.stop_all()
