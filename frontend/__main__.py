"""Run the HTTP front end: `python -m frontend`.

Serves the Falcon app with waitress, talking to the broker at
config.broker_frontend_addr.  Settings come from the environment (shared/config.py).
"""
from __future__ import annotations

import waitress

from frontend.app import create_app
from frontend.broker_client import BrokerClient
from shared.config import load_config
from shared.logs import setup_logging

# waitress answers bodies above max_request_body_size with its own plain-text
# 413.  Letting a little more through means the app sees bodies just over the
# limit and answers them with the API's JSON 413 instead.
BODY_SLACK_BYTES = 1024 * 1024


def main() -> None:
    config = load_config()
    setup_logging("frontend", config)
    client = BrokerClient(config)
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
    finally:
        client.close()


if __name__ == "__main__":
    main()
