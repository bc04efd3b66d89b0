"""Say on supervisord's terminal where the service is, once it is ready (program "ready_notice").

    listening on http://HOST:PORT, model NAME (revision, device, dtype), F front-end processes, N preprocess workers

Only for its own deployment: /health names the deployment that answers (a digest of
DEPLOYMENT_ID), so another copy of the service on the same PORT is not taken for this one.
Until then it watches the other programs through supervisord's control socket: a program that
stays down (FATAL, EXITED, or stopped with exit status 78: its settings cannot work) is reported
with the last line of its log, and a slow start (a first model download) says where to look.
With STOP_WHEN_DOWN (scripts/serve.sh) a program down before the service is ready also stops
the whole service, leaving $RUN_DIR/not-started for serve.sh's exit status.  It prints once and
exits (EXITED in `supervisorctl status` is its normal end).
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from shared.config import EXIT_CONFIG, is_loopback, load_config

POLL_SECONDS = 1.0
FIRST_HINT_SECONDS = 30.0  # a cached tiny model is ready well before this; a first download is not
HINT_EVERY_SECONDS = 120.0
GIVE_UP_SECONDS = 6 * 3600.0  # a bounded wait: by then someone has looked at the logs
DOWN_STATES = ("FATAL", "EXITED")
NOT_STARTED_MARK = "not-started"  # in RUN_DIR: scripts/serve.sh exits 1 when it finds it


def say(line: str) -> None:
    print(line, flush=True)


def read_health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            return json.loads(err.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def listening_line(config, health: dict) -> str:
    model = health.get("model", {})
    details = ", ".join(str(model[k]) for k in ("revision", "device", "dtype") if model.get(k))
    name = f"{model.get('name', config.model)} ({details})" if details else model.get("name", config.model)
    if model.get("test_model"):
        name += " [random test weights: answers are gibberish]"
    fronts, workers = config.frontend_workers, health["workers"]["preprocess"]
    line = (f"listening on http://{config.host}:{config.port}, model {name}, "
            f"{fronts} front-end process{'es' if fronts != 1 else ''}, "
            f"{workers} preprocess worker{'s' if workers != 1 else ''}")
    if config.host in ("0.0.0.0", "::"):
        line += f"; try http://127.0.0.1:{config.port}/ on this machine"
    if not config.api_key:  # shared/config.py allowed it: loopback, or ALLOW_UNAUTHENTICATED=1
        line += ("; no API key: this machine only" if is_loopback(config.host) else
                 "; no authentication: anyone who can reach the port can use it (ALLOW_UNAUTHENTICATED=1)")
    return line


def last_line(path: str) -> str:
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def programs_down(rpc, reported: set) -> list[str]:
    """'name STATE: last log line' for each program newly down (ours left out)."""
    if rpc is None:
        return []
    try:
        infos = rpc.supervisor.getAllProcessInfo()
    except Exception:  # supervisord shutting down or busy: try again next time
        return []
    lines = []
    for info in infos:
        name = f"{info['group']}:{info['name']}" if info["group"] != info["name"] else info["name"]
        # STOPPED with 78: it asked supervisord to stop it (shared.config.stay_down)
        gave_up = info["statename"] == "STOPPED" and info["exitstatus"] == EXIT_CONFIG
        if (info["statename"] in DOWN_STATES or gave_up) and info["name"] != "ready_notice" and name not in reported:
            reported.add(name)
            state = "cannot start (exit 78)" if gave_up or info["exitstatus"] == EXIT_CONFIG else info["statename"]
            lines.append(f"{name} {state}: {last_line(info['stdout_logfile'])}")
    return lines


def stop_service(rpc, run_dir: str) -> None:
    """Leave the mark for scripts/serve.sh and shut supervisord down (STOP_WHEN_DOWN)."""
    Path(run_dir, NOT_STARTED_MARK).touch()
    try:
        rpc.supervisor.shutdown()
    except Exception:  # already shutting down
        pass


def ours(config, health: dict) -> bool:
    """Whether /health was answered by this deployment's front end (not another copy's on PORT)."""
    return health.get("deployment", "") == config.deployment_tag


def main() -> int:
    config = load_config()
    probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
    url = f"http://{probe_host}:{config.port}/health" if ":" not in probe_host else f"http://[{probe_host}]:{config.port}/health"
    rpc = None
    if os.environ.get("SUPERVISOR_SERVER_URL"):
        from supervisor import childutils

        rpc = childutils.getRPCInterface(os.environ)
    run_dir = os.environ.get("RUN_DIR", ".")
    reported: set = set()
    started = time.monotonic()
    next_hint = started + FIRST_HINT_SECONDS
    while time.monotonic() - started < GIVE_UP_SECONDS:
        health = read_health(url)
        if (health and health.get("ready") and ours(config, health)
                and health["workers"]["preprocess"] >= config.preprocess_workers):
            say(listening_line(config, health))
            return 0
        down = programs_down(rpc, reported)
        for line in down:
            say(line)
        if down and config.stop_when_down:
            stop_service(rpc, run_dir)
            return 1
        if time.monotonic() >= next_hint:
            next_hint += HINT_EVERY_SECONDS
            why = (health or {}).get("reason", "the front end does not answer yet")
            if health and not ours(config, health):
                why = f"port {config.port} answers for another deployment"
            say(f"still starting after {time.monotonic() - started:.0f} s: {why}; a first start downloads the "
                f"model (~3.7 GB), see {run_dir}/gpu_worker.log")
        time.sleep(POLL_SECONDS)
    say(f"not ready after {GIVE_UP_SECONDS / 3600:.0f} h; see the logs in {run_dir}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
