"""Run the HTTP front end: `python -m frontend`.

Serves the Falcon app with waitress (set up in frontend/edge.py), talking to
the broker at config.broker_frontend_addr.  FRONTEND_WORKERS such processes
share one port (frontend/listen.py), each its own client of the broker.  Settings come from the environment
(shared/config.py).
"""
from __future__ import annotations

import errno
import sys

from frontend import edge
from frontend.app import create_app
from broker_client.client import BrokerClient
from shared.config import EXIT_CONFIG, StartupError, load_config, stay_down
from shared.logs import setup_logging


def main() -> int:
    config = load_config()
    log = setup_logging("frontend", config)
    try:
        client = BrokerClient(config)
    except StartupError as exc:  # no keys for a remote broker: one line, and stay down
        log.error("%s", exc)
        return EXIT_CONFIG
    try:
        server = edge.create_server(create_app(config, client), config)
        server.print_listen("Serving on http://{}:{}")
        server.run()
    except StartupError as exc:  # PORT served by another copy of the service (frontend/listen.py)
        log.error("cannot listen on HOST=%s PORT=%s: %s", config.host, config.port, exc)
        return EXIT_CONFIG
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
    sys.exit(stay_down(main()))
