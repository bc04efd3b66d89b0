"""Run the broker: `python -m broker` (supervisord program "broker")."""
import signal
import sys

from broker.broker import Broker
from shared.config import load_config
from shared.logs import setup_logging


def main() -> int:
    config = load_config()
    log = setup_logging("broker", config)
    broker = Broker(config)

    def stop(signum, frame):  # finish the current loop iteration, then close sockets
        broker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        broker.run()
    except Exception:
        log.exception("broker crashed")
        return 1
    log.info("broker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
