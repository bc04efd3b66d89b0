"""Run one preprocess worker: `python -m preprocess_worker` (supervisord starts N of them)."""
import signal
import sys

from preprocess_worker.worker import PreprocessWorker
from shared.config import EXIT_CONFIG, StartupError, load_config, stay_down
from shared.logs import setup_logging


def main() -> int:
    config = load_config()
    log = setup_logging("preprocess_worker", config)
    try:
        worker = PreprocessWorker(config)

        def stop(signum, frame):  # finish the loop iteration, then say goodbye to the broker
            worker.stopping = True

        signal.signal(signal.SIGTERM, stop)
        worker.run()
    except StartupError as exc:  # no keys for a remote broker, refused by it: one line, and stay down
        log.error("%s", exc)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("preprocess worker crashed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(stay_down(main()))
