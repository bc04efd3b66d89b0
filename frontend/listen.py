"""The front end's listening socket, shared by the FRONTEND_WORKERS processes of one deployment.

Each front-end process binds HOST:PORT itself with SO_REUSEPORT, so the kernel spreads new
connections over all of them and one dying (or restarting) leaves the others' connections and
listening sockets alone.  A port held by anything else without SO_REUSEPORT still fails to bind
(EADDRINUSE: the process says so and exits 78).

SO_REUSEPORT would also let a second copy of the service, run by the same user on the same PORT,
share the port and take half of the first one's clients.  `PortClaim` stops that: one front end
of the deployment holds a Linux abstract Unix socket named after the port and answers every
connection to it with its DEPLOYMENT_ID; a front end that finds the name held by another
deployment refuses to listen.  The name dies with its holder, so the others keep trying to take
it over (every second).
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

from shared.config import Config, StartupError

CLAIM_RETRY_S = 1.0
CLAIM_READ_TIMEOUT_S = 2.0


def shares_port(config: Config) -> bool:
    """Several processes serve the port only where they can tell a sibling from a stranger."""
    return config.frontend_workers > 1 and bool(config.deployment_id) and hasattr(socket, "SO_REUSEPORT")


def listening_socket(config: Config) -> socket.socket:
    """HOST:PORT bound (not yet listening: waitress does that); OSError as bind raises it."""
    family, kind, proto, _, address = socket.getaddrinfo(config.host or None, config.port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if shares_port(config):
            PortClaim(config.port, config.deployment_id).start()  # raises StartupError for another deployment
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class PortClaim:
    """Marks PORT as this deployment's while its front ends share it (see the module's docstring)."""

    def __init__(self, port: int, deployment_id: str):
        self.name = f"\0moondream-http-port-{port}"
        self.deployment_id = deployment_id.encode()
        self._held: socket.socket | None = None

    def start(self) -> None:
        if not self._try_to_hold():
            holder = self._ask_holder()
            if holder is not None and holder != self.deployment_id:
                raise StartupError(f"PORT is served by another deployment ({holder.decode(errors='replace')!r}, "
                                   f"this one is {self.deployment_id.decode()!r}): is another copy of the service "
                                   f"using it? set PORT to a free one")
        threading.Thread(target=self._serve, name="port-claim", daemon=True).start()

    def _try_to_hold(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.name)
            sock.listen(16)
        except OSError:
            sock.close()
            return False
        self._held = sock
        return True

    def _ask_holder(self) -> bytes | None:
        """The holder's DEPLOYMENT_ID, or None when it is gone, does not answer, or is another
        user's (the kernel lets only one user's sockets share a port: nothing to fear from it)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(CLAIM_READ_TIMEOUT_S)
                sock.connect(self.name)
                _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                return sock.recv(4096) if uid == os.getuid() else None
        except OSError:
            return None

    def _serve(self) -> None:
        """Answer for the port while holding the name; otherwise try to take it over."""
        while True:  # for the life of the process (a daemon thread)
            if self._held is None:
                time.sleep(CLAIM_RETRY_S)
                self._try_to_hold()
                continue
            try:
                conn, _ = self._held.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.sendall(self.deployment_id)
                except OSError:
                    pass
