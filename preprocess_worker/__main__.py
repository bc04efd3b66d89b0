"""Run one preprocess worker: `python -m preprocess_worker` (supervisord starts N of them)."""
import sys

from preprocess_worker.worker import PreprocessWorker
from shared.config import load_config
from shared.logs import setup_logging


def main() -> int:
    config = load_config()
    log = setup_logging("preprocess_worker", config)
    try:
        PreprocessWorker(config).run()
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("preprocess worker crashed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
