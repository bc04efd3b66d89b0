"""Run the MCP server: `python -m mcp_server` (Streamable HTTP) or `python -m mcp_server --stdio`.

Over HTTP (what supervisord runs): http://HOST:MCP_PORT/mcp, calling this host's front end.
MCP_PORT unset means off: the process then only waits, so that supervisord, which starts
every program, neither restarts it nor reports it as down.

Over stdio (what a desktop client starts itself):
    python -m mcp_server --stdio --endpoint http://gpu-box:5000 --image-dir ~/Pictures
with the service's key in VLM_API_KEY.  Logs go to stderr; stdout is the protocol.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from shared.config import EXIT_CONFIG, Config, load_config, stay_down
from shared.logs import setup_logging


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mcp_server", description=__doc__.split("\n")[0])
    parser.add_argument("--stdio", action="store_true", help="speak MCP on stdin/stdout instead of HTTP")
    parser.add_argument("--endpoint", help="the service to call (default MCP_ENDPOINT, or this host's PORT)")
    parser.add_argument("--image-dir", help="stdio only: directory whose image files tools may read "
                                            "(default MCP_IMAGE_DIR; none: file paths refused)")
    return parser.parse_args(argv)


def service_endpoint(config: Config) -> str:
    """MCP_ENDPOINT, or the front end on this host (HOST, or loopback when HOST is a wildcard)."""
    if config.mcp_endpoint:
        return config.mcp_endpoint
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.host, config.host)
    return f"http://{host if ':' not in host else f'[{host}]'}:{config.port}"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = load_config()
    log = setup_logging("mcp_server", config)
    # Their INFO lines repeat ours (a line per service call, per tool call, per start and stop).
    for chatty in ("httpx2", "uvicorn", "mcp"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if not args.stdio and not config.mcp_port:
        log.info("MCP_PORT is not set: the MCP server is off (this process only waits)")
        signal.pause()  # until supervisord stops it
        return 0
    import anyio  # the SDK and its web stack load only when the server runs

    from mcp_server.images import ImageSource
    from mcp_server.service import Service
    from mcp_server.tools import Tools, build_server

    endpoint = args.endpoint or service_endpoint(config)
    image_dir = (args.image_dir or config.mcp_image_dir) if args.stdio else None
    service = Service(endpoint, config.api_key, config.request_timeout)
    tools = Tools(service, ImageSource(image_dir, config.max_body_bytes), config.max_image_pixels)
    server = build_server(tools, file_paths=image_dir is not None)
    if args.stdio:
        log.info("MCP server on stdio, calling %s", endpoint)
        anyio.run(run_stdio, server, service)
        return 0
    from mcp_server import http

    host = http.listen_host(config.host, config.api_key)
    try:
        anyio.run(run_http, server, service, host, config)
    except OSError as exc:
        if exc.errno not in http.BIND_ERRORS:
            raise
        log.error("cannot listen on HOST=%s MCP_PORT=%s (%s): set MCP_PORT to a free port",
                  host, config.mcp_port, exc.strerror)
        return EXIT_CONFIG
    return 0


async def run_stdio(server, service) -> None:
    try:
        await server.run_stdio_async()
    finally:
        await service.aclose()


async def run_http(server, service, host: str, config: Config) -> None:
    from mcp_server import http

    try:
        await http.serve(server, host, config.mcp_port, config.api_key, config.max_body_bytes)
    finally:
        await service.aclose()


if __name__ == "__main__":
    sys.exit(stay_down(main()))
