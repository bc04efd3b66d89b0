"""Streamable HTTP at http://HOST:MCP_PORT/mcp, behind the service's API key.

The SDK's app (stateless: no MCP session to lose when this process restarts; plain JSON
answers, since every tool gives one answer) is wrapped in `RequireKey`, which checks the
same key as the front end, in the same two headers.  Without a key it listens on
loopback only, whatever HOST says.
"""
from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import socket

log = logging.getLogger("mcp_server")

UNAUTHORIZED = json.dumps({"error": {"code": "unauthorized", "message": (
    "missing or invalid API key: send the service's key as Authorization: Bearer <key> "
    "(or X-Moondream-Auth)")}}).encode()


class RequireKey:
    """ASGI middleware: HTTP requests without the key get 401 (the front end's JSON error)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self._key and not self._allowed(dict(scope["headers"])):
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(UNAUTHORIZED)).encode()),
                (b"www-authenticate", b'Bearer realm="moondream"')]})
            await send({"type": "http.response.body", "body": UNAUTHORIZED})
            return
        await self.app(scope, receive, send)

    def _allowed(self, headers: dict) -> bool:
        scheme, _, bearer = headers.get(b"authorization", b"").strip().partition(b" ")
        bearer = bearer.strip() if scheme.lower() == b"bearer" else b""
        # Both compared always, in constant time, as the front end does (frontend/app.py AuthMiddleware).
        bearer_ok = hmac.compare_digest(bearer, self._key)
        moondream_ok = hmac.compare_digest(headers.get(b"x-moondream-auth", b""), self._key)
        return bearer_ok | moondream_ok


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_host(host: str, api_key: str) -> str:
    """HOST, or loopback when no key protects the endpoint (said once in the log)."""
    if api_key or is_loopback(host):
        return host
    log.warning("VLM_API_KEY is not set: the MCP server listens on 127.0.0.1 only, not HOST=%s", host)
    return "127.0.0.1"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket; OSError as bind raises it (EADDRINUSE for a taken port)."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


BIND_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


# Room for the JSON-RPC envelope and the other arguments around an image of MAX_BODY_BYTES.
ENVELOPE_BYTES = 64 * 1024


async def serve(server, host: str, port: int, api_key: str, max_body_bytes: int) -> None:
    """Serve `server` (an MCPServer) until SIGTERM/SIGINT on an already checked host and port."""
    import uvicorn

    sock = bind(host, port)
    # The SDK's own body limit (4 MiB) is below the service's: an image the service takes must pass.
    mcp_app = server.streamable_http_app(stateless_http=True, json_response=True, host=host,
                                         max_request_body_size=max_body_bytes + ENVELOPE_BYTES)
    app = RequireKey(mcp_app, api_key)
    # log_config=None: uvicorn logs through our root logger; no access log (one line per tool call instead)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    log.info("MCP server on http://%s:%s/mcp", host if ":" not in host else f"[{host}]", port)
    await uvicorn.Server(config).serve(sockets=[sock])
