"""CURVE keys for the links to the broker (CurveZMQ: every connection encrypted and authenticated).

Make a set once, then copy the files each host needs (docs/operations.md, "Securing a
multi-host deployment"):

    python -m shared.keys generate DIR        (installed as a package: moondream-keys generate DIR)

    DIR/broker.key      broker.key_secret      the broker's pair: every process needs broker.key
                                               (to know it talks to the real broker), only the
                                               broker host the secret
    DIR/worker.key      worker.key_secret      a worker's pair: the broker accepts on its worker
                                               socket every worker*.key in its directory
    DIR/frontend.key    frontend.key_secret    a front end's pair: likewise frontend*.key on its
                                               front-end socket

Files are ZeroMQ certificates (zmq.auth).  A process with CURVE_KEYS_DIR set uses CURVE on every
broker socket; without it, a broker address beyond loopback is refused at start-up.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from shared.config import StartupError

log = logging.getLogger("keys")

BROKER = "broker"
WORKER = "worker"
FRONTEND = "frontend"
DOMAINS = {WORKER: "workers", FRONTEND: "frontends"}  # ZAP domain of the broker socket each role joins


def is_loopback(address: str) -> bool:
    """True for endpoints only this host can reach (tcp on a loopback address, ipc, inproc)."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = urlsplit(f"//{rest}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name: reachable from elsewhere
        return False


def require_keys_beyond_loopback(config, addresses: dict[str, str]) -> None:
    """StartupError when an address (setting name -> endpoint) leaves this host without CURVE keys."""
    if config.curve_keys_dir:
        return
    for setting, address in addresses.items():
        if not is_loopback(address):
            raise StartupError(
                f"{setting}={address} is reachable beyond this host, but no CURVE keys are set: anyone on the "
                f"network could join or read the traffic. Make keys with `python -m shared.keys generate DIR` and set "
                f"CURVE_KEYS_DIR=DIR on every process (docs/operations.md), or use a 127.0.0.1 address")


def _read(config, name: str, secret: bool) -> tuple[bytes, bytes | None]:
    path = Path(config.curve_keys_dir) / (f"{name}.key_secret" if secret else f"{name}.key")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise StartupError(f"CURVE_KEYS_DIR: cannot read {path} ({exc}); make keys with "
                           f"`python -m shared.keys generate DIR`") from None
    if secret and not secret_key:
        raise StartupError(f"CURVE_KEYS_DIR: {path} holds no secret key")
    return public, secret_key


def secure_server(sock: zmq.Socket, config, role: str) -> None:
    """Make a broker socket a CURVE server for clients of `role` (keys from CURVE_KEYS_DIR)."""
    public, secret = _read(config, BROKER, secret=True)
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_server = True
    sock.zap_domain = DOMAINS[role].encode()


def secure_client(sock: zmq.Socket, config, role: str) -> None:
    """Make a front end's or worker's socket a CURVE client that only talks to our broker."""
    public, secret = _read(config, role, secret=True)
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = _read(config, BROKER, secret=False)[0]


class AllowedKeys:
    """ZAP credentials check: is the client's public key one of `role`*.key in the keys directory?"""

    def __init__(self, config, role: str):
        self.role = role
        directory = Path(config.curve_keys_dir)
        self.keys = {zmq.auth.load_certificate(path)[0] for path in sorted(directory.glob(f"{role}*.key"))}
        if not self.keys:
            raise StartupError(f"CURVE_KEYS_DIR: no {role}*.key in {directory}: no {role} could connect")

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self.keys:
            return True
        log.warning("refused a %s connection: its CURVE key %s is not one of %s*.key in CURVE_KEYS_DIR",
                    self.role, client_key.decode(errors="replace"), self.role)
        return False


def start_authenticator(context: zmq.Context, config) -> ThreadAuthenticator:
    """The broker's ZAP handler: checks every new connection's key (a thread of its own)."""
    auth = ThreadAuthenticator(context, log=logging.getLogger("zap"))
    auth.start()
    for role, domain in DOMAINS.items():
        auth.configure_curve_callback(domain, credentials_provider=AllowedKeys(config, role))
    return auth


def _certificate_text(kind: str, public: bytes, secret: bytes | None = None) -> str:
    """A ZeroMQ certificate (the ZPL layout zmq.auth.load_certificate reads)."""
    lines = [f"#   ZeroMQ CURVE {kind} certificate (moondream-serving: python -m shared.keys)", "",
             "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create `path` with `mode` from its first byte (O_EXCL: never over an existing file), so a
    secret is never readable by others, not even between the write and a chmod."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # the umask may have taken bits off `mode` (never added any)


def generate(directory: Path) -> list[Path]:
    """A broker, a worker and a front-end key pair in `directory` (existing files are kept)."""
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    for name in (BROKER, WORKER, FRONTEND):
        public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
        if secret_path.exists():
            continue
        public, secret = zmq.curve_keypair()
        _write_new(secret_path, _certificate_text("secret", public, secret), 0o600)
        public_path.unlink(missing_ok=True)
        _write_new(public_path, _certificate_text("public", public), 0o644)
        made += [public_path, secret_path]
    return made


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "generate":
        print("usage: python -m shared.keys generate DIR", file=sys.stderr)
        return 2
    made = generate(Path(argv[1]))
    for path in made:
        print(path)
    if not made:
        print(f"{argv[1]} already holds every key pair; nothing made")
    return 0


if __name__ == "__main__":
    sys.exit(main())
