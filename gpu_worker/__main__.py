"""Run the GPU worker: `python -m gpu_worker` (supervisord program "gpu_worker").

Loads the model first and only then joins the broker, so the broker never
routes work to a worker that cannot serve it.  A model that does not load is
a configuration problem (not found, cannot be fetched): log one line, tell the
broker why (/health shows it) and exit 78, which keeps it down (no restart loop).
Any other load error exits 2 and is retried.
"""
import os
import signal
import sys

from gpu_worker.engine import ModelLoadError, load_model
from shared import keys, model_family, protocol
from shared.config import EXIT_CONFIG, StartupError, load_config, stay_down
from shared.logs import setup_logging


def size_torch_threads(config, log) -> None:
    """torch's default is one thread per core it sees, blind to a cgroup CPU quota and to the other
    processes of the stack on the same cores; config.torch_threads is sized from both
    (shared/host_size.default_torch_threads) unless TORCH_THREADS sets it."""
    import torch

    torch.set_num_threads(config.torch_threads)
    log.info("torch uses %d CPU threads (TORCH_THREADS=%s)", config.torch_threads,
             os.environ.get("TORCH_THREADS", "0: sized from the CPUs"))


def main() -> int:
    config = load_config()
    log = setup_logging("gpu_worker", config)
    try:  # before the minutes a model load can take
        keys.require_keys_beyond_loopback(config, {"BROKER_BACKEND_ADDR": config.broker_backend_addr})
        config = model_family.config_for_worker(config)  # its MOONDREAM_MODELS entry, named
    except (StartupError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    size_torch_threads(config, log)
    log.info("loading model %s (revision %s, device %s, dtype %s)", config.model, config.revision, config.device, config.dtype)
    try:
        model = load_model(config)
    except ModelLoadError as exc:  # not found, or cannot be fetched: restarting cannot help
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("model load failed: %s", reason)
        from shared.broker_link import tell_cannot_start

        tell_cannot_start(config, protocol.GPU, f"model load failed: {reason}")
        return EXIT_CONFIG
    except Exception as exc:
        log.error("model load failed: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return 2
    model.info["id"] = config.model_name  # the broker routes requests for this id here
    log.info("model ready: %s", model.info)

    from gpu_worker.worker import GpuWorker  # after loading: import errors in the loop show up as such

    # SIGTERM (supervisorctl stop) ends the loop like Ctrl-C: the I/O thread says goodbye to the broker.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        GpuWorker(config, model).run()
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("GPU worker crashed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(stay_down(main()))
