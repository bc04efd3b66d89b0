"""Run the HTTP front end: `python -m frontend`.

Serves the Falcon app with waitress (set up in frontend/edge.py), talking to
the broker at config.broker_frontend_addr.  Settings come from the environment
(shared/config.py).
"""
from __future__ import annotations

from frontend import edge
from frontend.app import create_app
from frontend.broker_client import BrokerClient
from shared.config import load_config
from shared.logs import setup_logging


def main() -> None:
    config = load_config()
    setup_logging("frontend", config)
    client = BrokerClient(config)
    try:
        server = edge.create_server(create_app(config, client), config)
        server.print_listen("Serving on http://{}:{}")
        server.run()
    finally:
        client.close()


if __name__ == "__main__":
    main()
