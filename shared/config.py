"""All configuration, read from environment variables in one place.

Every process calls `load_config()` once at start-up.  Names follow the seed
(VLM_API_KEY, HF_TOKEN, PREPROCESS_WORKERS, BATCH_SIZE, BATCH_TIMEOUT) where
they exist.  `describe()` feeds the README's configuration table.
"""
from __future__ import annotations

import ipaddress
import math
import os
import sys
from dataclasses import dataclass, field, fields

from shared import host_size


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _env(name: str, default, cast=str):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if cast is bool:
        word = raw.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:  # a typo ("tru") must not quietly read as false
            raise StartupError(f"{name}={raw!r} is not true or false (use one of {', '.join(TRUE_WORDS + FALSE_WORDS)})")
        return word in TRUE_WORDS
    try:
        return cast(raw)
    except ValueError:
        kind = "a whole number" if cast is int else "a number"
        raise StartupError(f"{name}={raw!r} is not {kind}") from None


@dataclass(frozen=True)
class Config:
    # --- model / GPU worker
    model: str = field(default="vikhyatk/moondream2", metadata={"env": "MOONDREAM_MODEL", "help": "hub id (vikhyatk/moondream2, moondream/moondream3-preview), local checkpoint directory, or random:full / random:tiny / random:md3-full / random:md3-tiny for benchmarks"})
    models: str = field(default="", metadata={"env": "MOONDREAM_MODELS", "help": "several models at once, one GPU worker each: `id=<source>,...` (e.g. moondream2=vikhyatk/moondream2,moondream3-preview=moondream/moondream3-preview; an entry without `id=` takes its family's id); requests pick one by `model`, the first is the default. Empty: MOONDREAM_MODEL alone"})
    model_index: int = field(default=0, metadata={"env": "MOONDREAM_MODEL_INDEX", "help": "which MOONDREAM_MODELS entry a GPU worker serves (0-based; supervisord sets it per worker program)"})
    revision: str = field(default="2025-06-21", metadata={"env": "MOONDREAM_REVISION", "help": "hub revision to pin (2025-06-21 or 2025-04-14); for moondream/moondream3-preview any other value replaces its pinned commit"})
    device: str = field(default="auto", metadata={"env": "MOONDREAM_DEVICE", "help": "auto, cuda, cuda:N or cpu"})
    dtype: str = field(default="auto", metadata={"env": "MOONDREAM_DTYPE", "help": "auto (bf16 on CUDA, float32 on CPU), bfloat16, float16, float32, or int8 (CPU: int8 linears, PyTorch quantized kernels)"})
    engine: str = field(default="native", metadata={"env": "MOONDREAM_ENGINE", "help": "native (our batched engine) or transformers (official remote code, one request at a time)"})
    hf_token: str = field(default="", metadata={"env": "HF_TOKEN", "help": "Hugging Face token (optional)", "secret": True})
    batch_size: int = field(default=32, metadata={"env": "BATCH_SIZE", "help": "max sequences decoding together in the GPU worker"})
    kv_cache_gb: float = field(default=0.0, metadata={"env": "KV_CACHE_GB", "help": "size (GB, 10^9 bytes) of the GPU worker's KV block pool, encoded images included; 0: room for BATCH_SIZE full-context sequences within 80% of the free GPU memory (a quarter of the available RAM on the CPU)"})
    kv_block_size: int = field(default=16, metadata={"env": "KV_BLOCK_SIZE", "help": "positions per KV block: a sequence takes blocks as it grows"})
    batch_timeout: float = field(default=0.005, metadata={"env": "BATCH_TIMEOUT", "help": "seconds the GPU worker waits to gather new requests when idle"})
    torch_threads: int = field(default=0, metadata={"env": "TORCH_THREADS", "help": "CPU threads of the GPU worker's torch; 0: on a GPU the CPUs it may use (affinity and cgroup quota), on the CPU those less one per front end, preprocess worker and the broker, at least 1. On a shared host set it to its share"})
    compile: str = field(default="auto", metadata={"env": "COMPILE", "help": "auto, on or off: decode steps through one torch.compile graph (gpu_worker/compiled_step.py; any failure falls back to eager with one warning). auto: on for CUDA (CUDA graphs), off on the CPU, where image requests decode eagerly anyway (split attention) and compiling takes minutes at first start (docs/performance.md 4.1)"})
    inductor_cache_dir: str = field(default="", metadata={"env": "TORCHINDUCTOR_CACHE_DIR", "help": "where COMPILE keeps compiled kernels across restarts; empty: $RUN_DIR/inductor-cache (torch's temp directory without RUN_DIR)"})
    gpu_step_timeout: float = field(default=120.0, metadata={"env": "GPU_STEP_TIMEOUT", "help": "seconds one GPU step may take; a GPU worker stuck longer exits (supervisord restarts it)"})
    image_cache_mb: int = field(default=2048, metadata={"env": "IMAGE_CACHE_MB", "help": "bytes budget (MiB) of encoded-image KV prefixes kept for reuse (in the KV pool; unused ones also make way for new requests)"})

    # --- fine-tuned variants (LoRA adapters; docs/operations.md "Variants")
    model_name: str = field(default="", metadata={"env": "MODEL_NAME", "help": "name of the base model in `model` fields (`<name>/<variant id>` selects a variant); empty: the family's id, moondream2 or moondream3-preview"})
    model_aliases: str = field(default="", metadata={"env": "MODEL_ALIASES", "help": "other names (comma-separated) accepted for the base model, e.g. clients' defaults; empty: moondream3-preview,vikhyatk/moondream2 for Moondream 2, moondream/moondream3-preview for Moondream 3"})
    variant_dir: str = field(default="", metadata={"env": "VARIANT_DIR", "help": "directory of variants (`<dir>/<id>/final.pt`), searched before the official cache `<HF hub cache>/md_variants`"})
    max_loaded_variants: int = field(default=8, metadata={"env": "MAX_LOADED_VARIANTS", "help": "variants kept loaded at once (least recently used out)"})
    variant_cache_mb: int = field(default=1024, metadata={"env": "VARIANT_CACHE_MB", "help": "bytes budget (MiB) of loaded variant adapters"})
    variant_max_mb: int = field(default=512, metadata={"env": "VARIANT_MAX_MB", "help": "largest variant file read or downloaded (MiB)"})
    variant_download: bool = field(default=False, metadata={"env": "VARIANT_DOWNLOAD", "help": "download a missing variant from MOONDREAM_ENDPOINT, as the official code does (off)"})
    variant_download_timeout: float = field(default=60.0, metadata={"env": "VARIANT_DOWNLOAD_TIMEOUT", "help": "seconds one variant download may take"})
    moondream_endpoint: str = field(default="https://api.moondream.ai", metadata={"env": "MOONDREAM_ENDPOINT", "help": "where VARIANT_DOWNLOAD fetches `/v1/variants/<id>/download`"})
    moondream_api_key: str = field(default="", metadata={"env": "MOONDREAM_API_KEY", "help": "key sent (X-Moondream-Auth) with variant downloads", "secret": True})

    # --- processes
    preprocess_workers: int = field(default=0, metadata={"env": "PREPROCESS_WORKERS", "help": "number of image-decode processes (supervisord numprocs); 0: the usable CPUs less those of the other processes, at least 2; 2 when the model runs on the CPU (shared/host_size.py)"})
    frontend_workers: int = field(default=0, metadata={"env": "FRONTEND_WORKERS", "help": "HTTP front-end processes sharing PORT (supervisord numprocs); 0: one per 7 usable CPUs beyond 2, at least 1; 1 when the model runs on the CPU (shared/host_size.py)"})
    preprocess_timeout: float = field(default=60.0, metadata={"env": "PREPROCESS_TIMEOUT", "help": "seconds one image may take to decode; a worker stuck longer exits and is restarted"})
    port: int = field(default=5000, metadata={"env": "PORT", "help": "HTTP port of the front end"})
    host: str = field(default="127.0.0.1", metadata={"env": "HOST", "help": "HTTP listen address: this machine only by default; 0.0.0.0 (all addresses) needs VLM_API_KEY or ALLOW_UNAUTHENTICATED=1"})
    stop_when_down: bool = field(default=False, metadata={"env": "STOP_WHEN_DOWN", "help": "when a program stays down before the service is ready, ready_notice names it and stops the whole service (scripts/serve.sh sets it, then exits 1); off: the others keep running and /health says why"})
    prometheus_multiproc_dir: str = field(default="", metadata={"env": "PROMETHEUS_MULTIPROC_DIR", "help": "directory where the front ends keep their metrics so that /metrics on any one reports all (prometheus_client's multiprocess mode; supervisord.conf sets $RUN_DIR/frontend-metrics); empty: each its own"})
    http_threads: int = field(default=32, metadata={"env": "HTTP_THREADS", "help": "waitress threads per front end (each open stream holds one); with several front ends each runs as many as the whole in-flight limit, so however the kernel spreads connections a request let in has a thread"})
    max_in_flight: int = field(default=0, metadata={"env": "MAX_IN_FLIGHT", "help": "requests (streams included) the front ends of one supervisord hold at once, together (a count shared through $RUN_DIR), beyond which they answer 429 at once; 0: HTTP_THREADS x FRONTEND_WORKERS. A front end on its own (a Kubernetes pod): its own count, 0 meaning HTTP_THREADS"})
    http_connection_limit: int = field(default=1000, metadata={"env": "HTTP_CONNECTION_LIMIT", "help": "open client connections per front end; beyond it new ones wait in the listen backlog"})
    http_header_timeout: float = field(default=10.0, metadata={"env": "HTTP_HEADER_TIMEOUT", "help": "seconds a client may take to send a request's line and headers (408 and close after)"})
    http_body_timeout: float = field(default=120.0, metadata={"env": "HTTP_BODY_TIMEOUT", "help": "seconds a client may take to send a request's body once its headers are in (408 and close after)"})
    http_idle_timeout: float = field(default=30.0, metadata={"env": "HTTP_IDLE_TIMEOUT", "help": "seconds an idle keep-alive connection stays open"})

    # --- ZeroMQ addresses (front ends and workers connect; the broker binds)
    broker_frontend_bind: str = field(default="tcp://127.0.0.1:5555", metadata={"env": "BROKER_FRONTEND_BIND", "help": "where the broker listens for front ends"})
    broker_backend_bind: str = field(default="tcp://127.0.0.1:5556", metadata={"env": "BROKER_BACKEND_BIND", "help": "where the broker listens for workers (tcp://0.0.0.0:5556 for workers on other hosts, with CURVE_KEYS_DIR)"})
    broker_frontend_addr: str = field(default="tcp://127.0.0.1:5555", metadata={"env": "BROKER_FRONTEND_ADDR", "help": "address front ends connect to"})
    broker_backend_addr: str = field(default="tcp://127.0.0.1:5556", metadata={"env": "BROKER_BACKEND_ADDR", "help": "address workers connect to"})
    deployment_id: str = field(default="", metadata={"env": "DEPLOYMENT_ID", "help": "name shared by the broker and every front end and worker of one deployment; a peer with another name is refused (default: the supervisord the process runs under, so two stacks on one host never mix; with CURVE_KEYS_DIR none, the keys prove it)"})
    curve_keys_dir: str = field(default="", metadata={"env": "CURVE_KEYS_DIR", "help": "directory of CURVE keys made by `python -m shared.keys generate DIR`: encrypts and authenticates every broker connection; required when a broker address is not loopback (docs/operations.md)"})
    heartbeat_interval: float = field(default=1.0, metadata={"env": "HEARTBEAT_INTERVAL", "help": "seconds between heartbeats"})
    no_gpu_grace: float = field(default=5.0, metadata={"env": "NO_GPU_GRACE", "help": "seconds a request waits for a GPU worker when none is registered, then 503"})
    heartbeat_liveness: int = field(default=3, metadata={"env": "HEARTBEAT_LIVENESS", "help": "missed heartbeats before a peer counts as dead"})

    # --- API and limits
    api_key: str = field(default="", metadata={"env": "VLM_API_KEY", "help": "when set, /v1 routes require it in X-Moondream-Auth or Authorization: Bearer; required when HOST is not loopback (unless ALLOW_UNAUTHENTICATED=1); spaces around it are a start-up error", "secret": True})
    allow_unauthenticated: bool = field(default=False, metadata={"env": "ALLOW_UNAUTHENTICATED", "help": "1: serve beyond loopback without VLM_API_KEY, to anyone who can reach the port (the ready line and /health say \"no authentication\")"})
    strict_fields: bool = field(default=False, metadata={"env": "STRICT_FIELDS", "help": "a top-level request field the server does not know is a 422 naming it; off: it is ignored (a newer client may send fields we do not know yet), named in the X-Ignored-Fields response header and a log line"})
    max_body_bytes: int = field(default=20 * 1024 * 1024, metadata={"env": "MAX_BODY_BYTES", "help": "largest request body accepted (413 above)"})
    max_image_pixels: int = field(default=50_000_000, metadata={"env": "MAX_IMAGE_PIXELS", "help": "largest decoded image, width x height"})
    max_image_side: int = field(default=16384, metadata={"env": "MAX_IMAGE_SIDE", "help": "largest image width or height"})
    max_text_chars: int = field(default=4000, metadata={"env": "MAX_TEXT_CHARS", "help": "longest question or object"})
    max_tokens_limit: int = field(default=2048, metadata={"env": "MAX_TOKENS_LIMIT", "help": "largest max_tokens a request may ask for"})
    max_objects_limit: int = field(default=200, metadata={"env": "MAX_OBJECTS_LIMIT", "help": "largest max_objects a request may ask for"})
    request_timeout: float = field(default=120.0, metadata={"env": "REQUEST_TIMEOUT", "help": "seconds before an unanswered request gets 504"})
    max_queue: int = field(default=256, metadata={"env": "MAX_QUEUE", "help": "requests waiting in the broker before 429"})
    public_base_url: str = field(default="", metadata={"env": "PUBLIC_BASE_URL", "help": "the service's address as clients reach it (e.g. https://vlm.example.com), put before batch result URLs; empty: the URLs are relative (/v1/batch/...), never built from the request's Host header"})
    allow_remote_images: bool = field(default=False, metadata={"env": "ALLOW_REMOTE_IMAGES", "help": "fetch http(s) image_url: public addresses only, at most 3 redirects, MAX_BODY_BYTES, 10 s (off: data URLs only)"})

    # --- bulk jobs (the Batch API; docs/operations.md "Batch jobs")
    batch_data_dir: str = field(default="batch-data", metadata={"env": "BATCH_DATA_DIR", "help": "where the batch job store (SQLite) and uploaded files live; shared by the front end and the batch worker"})
    batch_max_file_bytes: int = field(default=2 * 1024 ** 3, metadata={"env": "BATCH_MAX_FILE_BYTES", "help": "largest batch input file (limit_exceeded above)"})
    batch_max_lines: int = field(default=100_000, metadata={"env": "BATCH_MAX_LINES", "help": "most lines in one batch input file (limit_exceeded above)"})
    batch_max_line_bytes: int = field(default=10 * 1024 * 1024, metadata={"env": "BATCH_MAX_LINE_BYTES", "help": "longest input line; a longer one gets a per-line invalid_request"})
    batch_max_open_uploads: int = field(default=100, metadata={"env": "BATCH_MAX_OPEN_UPLOADS", "help": "uploads begun and not yet completed or aborted, at most (one API key: this is also the per-key quota); 429 quota_exceeded beyond"})
    batch_max_stored_bytes: int = field(default=20 * 1024 ** 3, metadata={"env": "BATCH_MAX_STORED_BYTES", "help": "bytes the batch store may hold in upload parts and job input files together (until jobs expire); 429 quota_exceeded beyond"})
    batch_retention_hours: float = field(default=168.0, metadata={"env": "BATCH_RETENTION_HOURS", "help": "hours a finished job and its results are kept, and an unfinished upload waits to be completed"})
    batch_in_flight: int = field(default=16, metadata={"env": "BATCH_IN_FLIGHT", "help": "batch lines submitted at once (keep it below BATCH_SIZE so interactive requests always find a slot)"})
    batch_yield_ms: int = field(default=-1, metadata={"env": "BATCH_YIELD_MS", "help": "while interactive requests decode, batch lines decode at most once per this many milliseconds; -1: 250 when the model runs on the CPU (each row costs step time there), 0 (never wait) on a GPU"})

    # --- the MCP server for AI agents (mcp_server/; README, "Moondream as a tool for AI agents")
    mcp_port: int = field(default=0, metadata={"env": "MCP_PORT", "help": "port of the MCP server (Streamable HTTP at http://HOST:MCP_PORT/mcp; the same API key; loopback only without one); 0 or unset: off"})
    mcp_endpoint: str = field(default="", metadata={"env": "MCP_ENDPOINT", "help": "the service the MCP server calls (its /v1 routes); empty: this host's front end, http://127.0.0.1:PORT when HOST is 0.0.0.0"})
    mcp_image_dir: str = field(default="", metadata={"env": "MCP_IMAGE_DIR", "help": "directory whose image files the stdio MCP server (`python -m mcp_server --stdio`) may read when a tool's image is a file path; empty: file paths refused"})

    # --- logging
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL", "help": "DEBUG, INFO, WARNING"})
    log_format: str = field(default="text", metadata={"env": "LOG_FORMAT", "help": "text or json (one object per line)"})

    @property
    def in_flight_limit(self) -> int:
        """MAX_IN_FLIGHT, or HTTP_THREADS per front end when unset: the limit of the front ends
        of one supervisord together (frontend/edge.py in_flight_count)."""
        return self.max_in_flight if self.max_in_flight > 0 else self.http_threads * max(1, self.frontend_workers)

    @property
    def deployment_tag(self) -> str:
        """A short digest of deployment_id, shown on /health (the id itself may be a file path)."""
        import hashlib

        return hashlib.sha256(self.deployment_id.encode()).hexdigest()[:12] if self.deployment_id else ""

    @property
    def heartbeat_expiry(self) -> float:
        return self.heartbeat_interval * self.heartbeat_liveness


# Numeric settings: every one is >= 0 (0 often meaning "size it for me") unless listed here.
POSITIVE = {"batch_size", "gpu_step_timeout", "max_loaded_variants", "variant_max_mb", "variant_download_timeout",
            "preprocess_timeout", "http_threads", "http_connection_limit", "http_header_timeout",
            "http_body_timeout", "http_idle_timeout", "heartbeat_interval", "heartbeat_liveness", "max_body_bytes",
            "max_image_pixels", "max_image_side", "max_text_chars", "max_tokens_limit", "max_objects_limit",
            "request_timeout", "max_queue", "batch_max_file_bytes", "batch_max_lines", "batch_max_line_bytes",
            "batch_retention_hours", "batch_in_flight", "batch_max_open_uploads",
            "batch_max_stored_bytes"}
RANGES = {"port": (1, 65535), "batch_yield_ms": (-1, None)}  # (least, most); None: no bound


def load_config(exit_on_error: bool = True) -> Config:
    """The settings from the environment.  A setting that cannot work is one line on stderr naming
    the variable, and exit EXIT_CONFIG (supervisord leaves such a process down); with
    exit_on_error=False, StartupError instead."""
    try:
        return _load_config()
    except StartupError as exc:
        if not exit_on_error:
            raise
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(stay_down(EXIT_CONFIG)) from None  # under supervisord: down at once, no retries


def _load_config() -> Config:
    values = {}
    for f in fields(Config):
        cast = type(f.default) if not isinstance(f.default, bool) else bool
        values[f.name] = _env(f.metadata["env"], f.default, cast)
    check_values(values)
    if not values["deployment_id"] and not values["curve_keys_dir"]:
        # Every program of one supervisord sees its control socket's URL, and no program of another.
        values["deployment_id"] = os.environ.get("SUPERVISOR_SERVER_URL", "")
    # Process counts left at 0 follow the CPUs; resolved here so that every process sees the same numbers.
    if values["preprocess_workers"] <= 0 or values["frontend_workers"] <= 0 or values["torch_threads"] <= 0:
        cpus = host_size.usable_cpus()
        on_cpu = host_size.model_on_cpu(values["device"])
        if values["preprocess_workers"] <= 0:
            values["preprocess_workers"] = host_size.default_preprocess_workers(cpus, on_cpu)
        if values["frontend_workers"] <= 0:
            values["frontend_workers"] = host_size.default_frontend_workers(cpus, on_cpu)
        if values["torch_threads"] <= 0:
            values["torch_threads"] = host_size.default_torch_threads(
                cpus, values["frontend_workers"], values["preprocess_workers"], on_cpu)
    return Config(**values)


def check_values(values: dict) -> None:
    """Numbers in range, and no silent open door (a key, or loopback, or a switch that says so)."""
    for f in fields(Config):
        value = values[f.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        least, most = RANGES.get(f.name, (0, None))
        name = f.metadata["env"]
        if isinstance(value, float) and not math.isfinite(value):
            raise StartupError(f"{name}={value} is not a finite number")
        if f.name in POSITIVE and value <= 0:
            raise StartupError(f"{name}={value} must be above 0")
        if value < least or (most is not None and value > most):
            bounds = f"between {least} and {most}" if most is not None else f"at least {least}"
            raise StartupError(f"{name}={value} must be {bounds}")
    if values["compile"] not in ("auto", "on", "off"):
        raise StartupError(f"COMPILE={values['compile']!r} is not one of auto, on, off")
    key = values["api_key"]
    if key != key.strip():
        what = "is only spaces" if not key.strip() else "has spaces or line breaks around it"
        raise StartupError(f"VLM_API_KEY {what}: clients could never send it; set it without them")
    if not key and not values["allow_unauthenticated"] and not is_loopback(values["host"]):
        raise StartupError(f"HOST={values['host'] or '(all addresses)'} would serve other machines with no API key: "
                           "set VLM_API_KEY, or HOST=127.0.0.1 for this machine only, or ALLOW_UNAUTHENTICATED=1 "
                           "to serve anyone who can reach the port")


def is_loopback(host: str) -> bool:
    """Whether HOST reaches this machine only ("" and 0.0.0.0 mean every address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


# Exit status of a process whose settings cannot work (a port taken, keys missing, a broker of
# another deployment, a model that cannot be fetched).  supervisord.conf lists it in exitcodes,
# and stay_down() asks supervisord not to retry it: such a process stays down at once (STOPPED,
# exit status 78) instead of restarting in a loop.
EXIT_CONFIG = 78


def stay_down(status: int) -> int:
    """`status`, for `sys.exit(stay_down(main()))`.  For EXIT_CONFIG under supervisord, first ask it
    to stop this program: an exit within startsecs would otherwise count as a failed start and be
    retried (startretries) before FATAL.  The program then shows STOPPED with exit status 78, which
    ready_notice reports as down."""
    name, group = os.environ.get("SUPERVISOR_PROCESS_NAME"), os.environ.get("SUPERVISOR_GROUP_NAME")
    if status != EXIT_CONFIG or not os.environ.get("SUPERVISOR_SERVER_URL") or not name:
        return status
    import signal

    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the stop's SIGTERM: we are leaving with 78 anyway
    except ValueError:  # not the main thread (the GPU worker's I/O thread): it calls os._exit right after
        pass
    try:
        from supervisor import childutils

        childutils.getRPCInterface(os.environ).supervisor.stopProcess(f"{group or name}:{name}", False)
    except Exception:  # supervisord gone or busy: it retries and shows FATAL, as before
        pass
    return status


class StartupError(Exception):
    """A setting that cannot work: the process logs the message as one line and exits EXIT_CONFIG."""


def describe() -> list[tuple[str, str, str]]:
    """(env var, default, help) for every setting."""
    return [(f.metadata["env"], "" if f.metadata.get("secret") else str(f.default), f.metadata["help"]) for f in fields(Config)]
