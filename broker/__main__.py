"""Run the broker: `python -m broker` (supervisord program "broker")."""
import signal
import sys

from broker.broker import Broker
from shared.config import EXIT_CONFIG, StartupError, load_config, stay_down
from shared.logs import setup_logging


def main() -> int:
    config = load_config()
    log = setup_logging("broker", config)
    try:
        broker = Broker(config)
    except StartupError as exc:  # a port taken, keys missing: one line, and stay down
        log.error("%s", exc)
        return EXIT_CONFIG

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
    sys.exit(stay_down(main()))
