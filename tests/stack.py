"""Start real processes on free ports for tests and benchmarks.

`running_stack()` runs the whole service under real supervisord (supervisord.conf
at the repo root) with the tiny test model, waits until GET /health says ready,
and shuts it down afterwards:

    with running_stack() as stack:
        requests.get(stack.url + "/health")
        stack.supervisorctl("restart", "gpu_worker")

`ProcessGroup` starts single processes (`python -m broker`, ...) with the same
environment, for tests of the broker without HTTP.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
TEST_MODEL = "tests/conformance/main"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_env(run_dir: Path, **overrides) -> dict:
    """Environment for every process of one test stack: its own ports, fast heartbeats."""
    front, back = free_port(), free_port()
    env = dict(os.environ)
    env.update({
        "RUN_DIR": str(run_dir),
        "PORT": str(free_port()),
        "HOST": "127.0.0.1",
        "BROKER_FRONTEND_BIND": f"tcp://127.0.0.1:{front}",
        "BROKER_FRONTEND_ADDR": f"tcp://127.0.0.1:{front}",
        "BROKER_BACKEND_BIND": f"tcp://127.0.0.1:{back}",
        "BROKER_BACKEND_ADDR": f"tcp://127.0.0.1:{back}",
        # Shared by the stack's processes and a test's in-process BrokerClient (under supervisord
        # it would otherwise default to supervisord's control socket, which the test lacks).
        "DEPLOYMENT_ID": f"test-{run_dir.name}",
        "MOONDREAM_MODEL": str(REPO / TEST_MODEL),
        "MOONDREAM_DEVICE": "cpu",
        "PREPROCESS_WORKERS": "2",
        "FRONTEND_WORKERS": "1",  # explicit, as supervisord's numprocs needs (tests of several set more)
        "HEARTBEAT_INTERVAL": "0.5",
        "HEARTBEAT_LIVENESS": "6",  # 3 s: a CPU test model step can take a second
        "NO_GPU_GRACE": "2",
        "IMAGE_CACHE_MB": "256",
        "BATCH_DATA_DIR": str(run_dir / "batch"),  # the batch job store: survives a supervisord restart
        "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def config_from_env(env: dict):
    """The Config the processes started with `env` will see."""
    from unittest import mock

    from shared.config import load_config

    with mock.patch.dict(os.environ, env, clear=True):
        return load_config()


class ProcessGroup:
    """Single service processes (`python -m <module>`) that are all stopped at the end."""

    def __init__(self, env: dict, log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, module: str, name: Optional[str] = None, **env_overrides) -> subprocess.Popen:
        name = name or f"{module}-{len(self.procs)}"
        log = open(self.log_dir / f"{name}.log", "ab")
        env = {**self.env, **{k: str(v) for k, v in env_overrides.items()}}
        proc = subprocess.Popen([sys.executable, "-m", module], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        proc.log_path = self.log_dir / f"{name}.log"
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclasses.dataclass
class Stack:
    run_dir: Path
    env: dict
    process: subprocess.Popen  # supervisord

    @property
    def port(self) -> int:
        return int(self.env["PORT"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self):
        return config_from_env(self.env)

    def supervisorctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(REPO / "supervisord.conf"), *args],
                              env=self.env, cwd=REPO, capture_output=True, text=True, timeout=60, check=check)

    def states(self) -> dict[str, str]:
        """Program name -> supervisord state (RUNNING, STARTING, FATAL, ...)."""
        out = self.supervisorctl("status").stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if len(line.split()) >= 2}

    def pid(self, name: str) -> int:
        return int(self.supervisorctl("pid", name).stdout.strip())

    def log(self, name: str) -> str:
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Wait until /health says ready with every preprocess worker registered."""
        want = int(self.env["PREPROCESS_WORKERS"])
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"supervisord exited:\n{self.log_tails()}")
            try:
                code, body = self.health()
                last = body
                if code == 200 and body.get("workers", {}).get("preprocess") == want:
                    return body
            except (OSError, ValueError) as err:
                last = err
            time.sleep(0.2)
        raise TimeoutError(f"stack not ready after {timeout} s: {last}; {self.states()}\n{self.log_tails()}")

    def terminal(self) -> str:
        """What supervisord printed on its terminal (ready_notice's lines)."""
        return (self.run_dir / "terminal.out").read_text(errors="replace")

    def log_tails(self, lines: int = 15) -> str:
        """The end of every log in the run directory (for failure messages)."""
        parts = []
        for path in sorted(self.run_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.supervisorctl("shutdown")
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@contextlib.contextmanager
def running_stack(preprocess_workers: int = 2, ready_timeout: float = 90.0, keep_run_dir: bool = False,
                  **env_overrides) -> Iterator[Stack]:
    """The whole service under supervisord on free ports; yields a ready Stack."""
    stack = launch_stack(preprocess_workers, **env_overrides)
    try:
        stack.wait_ready(ready_timeout)
        yield stack
    finally:
        stack.stop()
        if not (keep_run_dir or os.environ.get("KEEP_RUN_DIR")):  # KEEP_RUN_DIR=1 keeps the logs for a look
            shutil.rmtree(stack.run_dir, ignore_errors=True)


def launch_stack(preprocess_workers: int = 2, **env_overrides) -> Stack:
    """Start supervisord with the whole service on free ports; returns at once (the caller stops it)."""
    run_dir = Path(tempfile.mkdtemp(prefix="md-"))  # short: the control socket path has a length limit
    env = stack_env(run_dir, PREPROCESS_WORKERS=preprocess_workers, **env_overrides)
    # as scripts/serve.sh does: a GPU worker program per extra MOONDREAM_MODELS entry
    from shared.model_family import write_worker_programs

    write_worker_programs(config_from_env(env), str(run_dir / "gpu_workers"))
    with open(run_dir / "terminal.out", "wb") as terminal:  # what `bash scripts/serve.sh` would show
        proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-c", str(REPO / "supervisord.conf")],
                                env=env, cwd=REPO, stdout=terminal, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Stack(run_dir=run_dir, env=env, process=proc)


def wait_for(predicate, timeout: float, what: str, stack=None) -> None:
    """Poll `predicate` (errors count as not yet) until true, or fail naming `what`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    detail = f"; states {stack.states()}" if stack is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
