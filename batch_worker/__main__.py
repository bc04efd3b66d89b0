"""Run the batch worker: `python -m batch_worker` (supervisord starts one).

It works through the jobs in BATCH_DATA_DIR (shared/batch_store.py) by sending
their lines to the broker at config.broker_frontend_addr, like a front end.
One per data directory: two would run every line twice (the results would
still be written once).
"""
from __future__ import annotations

import signal
import sys

from batch_worker.worker import BatchWorker
from broker_client.client import BrokerClient
from shared.config import EXIT_CONFIG, StartupError, load_config, stay_down
from shared.logs import setup_logging


def main() -> int:
    config = load_config()
    log = setup_logging("batch_worker", config)
    try:
        client = BrokerClient(config)
    except StartupError as exc:  # no keys for a remote broker: one line, and stay down
        log.error("%s", exc)
        return EXIT_CONFIG
    worker = BatchWorker(config, client)

    def stop(signum, frame):
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("batch worker crashed")
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(stay_down(main()))
