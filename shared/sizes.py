"""`python -m shared.sizes`: the process counts this host gets, for the shell.

    eval "$(python -m shared.sizes)"   # scripts/serve.sh, the Dockerfile

prints `export FRONTEND_WORKERS=N PREPROCESS_WORKERS=M TORCH_THREADS=T` (each as set, or sized
from the CPUs by shared/host_size.py when unset or 0): supervisord needs the counts as numbers
before it starts (numprocs), and every process then sees the same figures.  A module of its
own because it reads the configuration, which itself builds on host_size."""
from __future__ import annotations

from shared.config import load_config


def main() -> None:
    config = load_config()
    print(f"export FRONTEND_WORKERS={config.frontend_workers} PREPROCESS_WORKERS={config.preprocess_workers} "
          f"TORCH_THREADS={config.torch_threads}")


if __name__ == "__main__":
    main()
