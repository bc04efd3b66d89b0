"""What `scripts/serve.sh` checks before it touches anything: `python -m shared.preflight`.

Prints one line and exits 1 when the service cannot start here:
- supervisord already runs with this RUN_DIR (`serve.sh` run twice from one checkout): the
  second run would otherwise empty the first one's metrics directory before supervisord
  refused it with a message about its control socket;
- a port the service listens on (PORT, the broker's tcp binds) is held by another program, a
  second copy of the service included.  The programs would say so themselves (exit 78), but
  only after the others had started.
Exits 0, printing nothing, when all is clear.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from shared.config import Config, load_config


def running_supervisord(run_dir: Path) -> Optional[str]:
    """'pid N' (or 'running') when a supervisord answers on RUN_DIR's control socket, else None."""
    sock_path = run_dir / "supervisor.sock"
    if not sock_path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(sock_path))
        except OSError:  # a stale socket file: its supervisord is gone
            return None
    try:
        return f"pid {int((run_dir / 'supervisord.pid').read_text().strip())}"
    except (OSError, ValueError):
        return "running"


def port_taken(host: str, port: int) -> Optional[str]:
    """The bind error when HOST:PORT is held by a listening socket, else None."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        return None  # the program itself reports an address it cannot resolve
    with socket.socket(family, kind, proto) as sock:
        # SO_REUSEADDR: a port with connections in TIME_WAIT is free; a listening socket still is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.strerror if exc.errno == errno.EADDRINUSE else None
    return None


def tcp_host_port(address: str) -> Optional[tuple[str, int]]:
    """tcp://HOST:PORT -> (HOST, PORT); None for other transports or a wildcard port."""
    if not address.startswith("tcp://"):
        return None
    host, _, port = address[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    if not port.isdigit():
        return None
    return ("0.0.0.0" if host == "*" else host), int(port)


def problem(config: Config, run_dir: Path) -> Optional[str]:
    """The one line saying why the service cannot start here, or None."""
    running = running_supervisord(run_dir)
    if running:
        return (f"the service already runs from RUN_DIR={run_dir} (supervisord {running}): see "
                f"`RUN_DIR={run_dir} .venv/bin/supervisorctl -c supervisord.conf status`, stop it with "
                f"`... shutdown`, or give a second copy its own RUN_DIR, PORT and broker ports")
    taken = [("PORT", config.host, config.port)]
    for setting in ("broker_frontend_bind", "broker_backend_bind"):
        bind = tcp_host_port(getattr(config, setting))
        if bind:
            taken.append((setting.upper(), *bind))
    for setting, host, port in taken:
        error = port_taken(host, port)
        if error:
            return (f"cannot start: {setting} {host}:{port} is taken ({error}), by another program or another "
                    f"copy of this service; set {setting} to a free port")
    return None


def main() -> int:
    line = problem(load_config(), Path(os.environ.get("RUN_DIR", "run")))
    if line:
        print(line, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
