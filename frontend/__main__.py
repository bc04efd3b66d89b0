"""Run the HTTP front end: `python -m frontend`.

Serves the Falcon app with waitress, talking to the broker at
config.broker_frontend_addr.  Settings come from the environment (shared/config.py).
"""
from __future__ import annotations

import errno
import json
import sys

import waitress
import waitress.utilities

from frontend.app import create_app
from frontend.broker_client import BrokerClient
from shared.config import EXIT_CONFIG, StartupError, load_config
from shared.logs import setup_logging

# waitress answers bodies above max_request_body_size with its own plain-text
# 413.  Letting a little more through means the app sees bodies just over the
# limit and answers them with the API's JSON 413 instead.
BODY_SLACK_BYTES = 1024 * 1024


def json_waitress_errors() -> None:
    """Requests that never reach the app (malformed HTTP, a Content-Length far over
    the limit) are answered by waitress itself, in plain text.  The API promises
    JSON errors everywhere, so waitress's one error renderer gets our shape.
    (waitress has no hook for this; its Error classes all render through here.)"""

    def to_response(self, ident=None):
        code = _WAITRESS_CODES.get(self.code, "bad_request" if self.code < 500 else "internal_error")
        body = json.dumps({"error": {"code": code, "message": f"{self.reason}: {self.body}"},
                           "request_id": None}).encode()
        return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body

    waitress.utilities.Error.to_response = to_response


_WAITRESS_CODES = {400: "bad_request", 413: "payload_too_large", 431: "headers_too_large", 500: "internal_error"}


def main() -> int:
    config = load_config()
    log = setup_logging("frontend", config)
    json_waitress_errors()
    try:
        client = BrokerClient(config)
    except StartupError as exc:  # no keys for a remote broker: one line, and stay down
        log.error("%s", exc)
        return EXIT_CONFIG
    try:
        waitress.serve(
            create_app(config, client),
            host=config.host,
            port=config.port,
            threads=config.http_threads,  # each open stream holds a thread
            max_request_body_size=config.max_body_bytes + BODY_SLACK_BYTES,
            # Lets waitress read ahead on the connection, which is how it
            # notices a client that hung up (environ["waitress.client_disconnected"]).
            channel_request_lookahead=1,
            ident="moondream-server",
        )
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        log.error("cannot listen on HOST=%s PORT=%s (%s): another process, perhaps another copy of this "
                  "service, holds it; set PORT to a free one", config.host, config.port, exc.strerror)
        return EXIT_CONFIG
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
