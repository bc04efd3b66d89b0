"""Two copies of the service on one host with the same broker ports (real supervisord, both).

The second broker cannot listen: it says so in one line and stays down at once (exit 78: it
asks supervisord to stop it, STOPPED; not a restart loop).  The second stack's front end and workers reach the first stack's broker instead, and
refuse it (DEPLOYMENT_ID differs: each supervisord gives its programs its own): the workers stop
for good, the front end's /health is 503 with the reason, and no request of either stack is
answered by the other.  The terminal (supervisord's stdout, what `bash scripts/serve.sh`
shows) has the listening line for the first stack and the broker's reason for the second.
"""
from __future__ import annotations

import json
import shutil
import socket
import urllib.error
import urllib.request

import pytest

from shared.config import EXIT_CONFIG
from tests.stack import ProcessGroup, launch_stack, running_stack, stack_env, wait_for

pytestmark = pytest.mark.timeout(240)

BROKER_PORTS = ("BROKER_FRONTEND_BIND", "BROKER_FRONTEND_ADDR", "BROKER_BACKEND_BIND", "BROKER_BACKEND_ADDR")


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_second_stack_on_taken_broker_ports_stays_down_and_never_cross_wires():
    # DEPLOYMENT_ID left empty, as `bash scripts/serve.sh` leaves it: each supervisord gives its own.
    with running_stack(preprocess_workers=1, DEPLOYMENT_ID="") as first:
        second = launch_stack(preprocess_workers=1, DEPLOYMENT_ID="", **{name: first.env[name] for name in BROKER_PORTS})
        try:
            # Down for good at once: exit 78 and stopped (shared.config.stay_down), never retried.
            wait_for(lambda: second.states().get("broker") == "STOPPED", 60, "the second broker down", second)
            log = second.log("broker")
            assert "cannot listen on BROKER_FRONTEND_BIND=" in log and "Address already in use" in log, log
            assert "Traceback" not in log
            attempts = log.count("cannot listen on")
            assert attempts == 1, log
            # ... and on the terminal of `bash scripts/serve.sh`, instead of a listening line.
            wait_for(lambda: "broker cannot start (exit 78): " in second.terminal(), 30,
                     "the terminal to name the broker", second)
            assert "cannot listen on BROKER_FRONTEND_BIND=" in second.terminal()

            # Its workers met the first broker, were refused, and stay down with the reason.
            for program, log_name in (("preprocess:preprocess_00", "preprocess_00"), ("gpu_worker", "gpu_worker")):
                wait_for(lambda: second.states().get(program) == "STOPPED", 90, f"{program} down", second)
                assert "refused this worker: this broker belongs to deployment" in second.log(log_name)

            code, health = second.health()
            assert code == 503 and health["ready"] is False
            assert "belongs to another deployment" in health["reason"], health
            code, body = post(second.url + "/v1/query", {"question": "Hi?", "settings": {"max_tokens": 4}})
            assert code == 503 and "another deployment" in body["error"]["message"], body

            # The first stack never noticed beyond a log line: same workers, still serving.
            wait_for(lambda: "listening on http://127.0.0.1:" in first.terminal(), 30, "the listening line", first)
            assert "listening on" not in second.terminal()
            code, health = first.health()
            assert code == 200 and health["workers"] == {"preprocess": 1, "gpu": 1}, health
            code, body = post(first.url + "/v1/query", {"question": "Hi?", "settings": {"max_tokens": 4}})
            assert code == 200, body
            assert "refused" in first.log("broker")
            assert second.log("broker").count("cannot listen on") == attempts  # no restart since
        finally:
            second.stop()
            shutil.rmtree(second.run_dir, ignore_errors=True)


def test_a_front_end_whose_http_port_is_taken_says_so_and_exits_78(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = stack_env(tmp_path, PORT=taken.getsockname()[1])
        frontend = ProcessGroup(env, tmp_path).start("frontend", "frontend")
        assert frontend.wait(timeout=60) == EXIT_CONFIG
    log = frontend.log_path.read_text()
    assert f"cannot listen on HOST=127.0.0.1 PORT={env['PORT']}" in log and "set PORT to a free one" in log, log
    assert "Traceback" not in log
