"""Fine-tuned variants: LoRA adapters on the text decoder, found, checked, loaded, kept.

A variant (`ft-alpha@100`: fine-tune id @ step) adds B (A u) to the output of four
linears in every text block (docs/model.md, "Fine-tuned variants"):

    attn.qkv  u = h, the block's layer-normed input
    attn.proj u = h as well (NOT the attention output that proj multiplies)
    mlp.fc1   u = h
    mlp.fc2   u = the GELU output that fc2 multiplies

Files are flat state dicts (`<dir>/<id>/final.pt`) loaded with weights_only=True.
`VariantStore` finds them (an operator's directory, then the official cache
layout `<hf cache>/md_variants/<id>/final.pt`), optionally downloads a missing
one in the background, and keeps the loaded ones in an LRU bounded by count and
bytes.  Running sequences hold their `Adapter` object, so evicting it from the
store never changes a request in flight.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from shared import variant_ids

log = logging.getLogger("gpu_worker.variants")

ADAPTED = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
# Downloads (VARIANT_DOWNLOAD): a failed one is remembered this long, so that requests for an
# unknown id do not each cost an outbound call carrying the operator's key; and at most this
# many run or wait at once (more distinct ids get a 503 until one ends).
FAILED_DOWNLOAD_TTL_S = 60.0
MAX_FAILED_REMEMBERED = 1024
MAX_DOWNLOADS = 4

# The training code's names -> the model's, by substring replacement in this order.
_TRAINING_NAMES = (
    ("text_model.transformer.h", "text.blocks"),
    (".mixer", ".attn"),
    (".out_proj", ".proj"),
    (".Wqkv", ".qkv"),
    (".parametrizations.weight.0", ""),
)


class VariantError(ValueError):
    """A variant request that cannot be served; `status` is the HTTP status."""

    status = 422
    code = "invalid_variant"


class VariantsUnsupported(VariantError):
    """The model has no pinned variant format (Moondream 3: no public adapter, and the
    reference and Moondream's engine apply adapters to different layers)."""

    status = 422
    code = "variants_not_supported"


class VariantNotFound(VariantError):
    status = 404
    code = "variant_not_found"


class VariantInvalid(VariantError):
    """The file exists but is not a usable adapter for this model."""

    status = 422
    code = "invalid_variant"


class DownloadsBusy(VariantError):
    """MAX_DOWNLOADS downloads are under way: try again shortly."""

    status = 503
    code = "variant_downloads_busy"


class BadVariantId(VariantError, variant_ids.BadVariantId):
    """A malformed id (400): the shared check's error, raised as a VariantError."""

    status = 400
    code = "invalid_variant_id"


def check_variant_id(variant: object) -> str:
    try:
        return variant_ids.check_variant_id(variant)
    except variant_ids.BadVariantId as err:
        raise BadVariantId(str(err)) from None


def default_cache_dir() -> Path:
    """Where the official code keeps variants: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


@dataclass(eq=False)  # hashed by identity: a reloaded file is another Adapter
class Adapter:
    """One variant's low-rank pairs: layers[i][name] = (A (rank, in), B (out, rank))."""

    variant: str
    rank: int
    layers: list  # per block: {linear name: (A, B)}

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for pair in layer.values() for t in pair)


def model_key(name: str) -> str:
    for old, new in _TRAINING_NAMES:
        name = name.replace(old, new)
    return name


def adapter_from_state_dict(variant: str, state: object, cfg, device, dtype) -> Adapter:
    """Check a loaded state dict against the model's shapes and build the Adapter.
    Raises VariantInvalid naming the first problem."""
    if not isinstance(state, dict) or not state:
        raise VariantInvalid(f"variant {variant}: the file does not hold a state dict of tensors")
    tensors = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise VariantInvalid(f"variant {variant}: entry {str(key)[:80]!r} is not a named tensor")
        tensors[model_key(key)] = value
    in_dims = {"attn.qkv": cfg.dim, "attn.proj": cfg.dim, "mlp.fc1": cfg.dim, "mlp.fc2": cfg.ff_dim}
    out_dims = {"attn.qkv": (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, "attn.proj": cfg.dim,
                "mlp.fc1": cfg.ff_dim, "mlp.fc2": cfg.dim}
    layers, rank, used = [], None, set()
    for i in range(cfg.n_layers):
        layer = {}
        for name in ADAPTED:
            prefix = f"text.blocks.{i}.{name}"
            a, b = tensors.get(prefix + ".A"), tensors.get(prefix + ".B")
            if a is None or b is None:
                raise VariantInvalid(f"variant {variant}: {prefix}.A/.B missing (every block needs all four adapters)")
            r = a.shape[0] if a.dim() == 2 else -1
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_dims[name] or b.shape != (out_dims[name], r) or r < 1:
                raise VariantInvalid(f"variant {variant}: {prefix} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                                     f"this model needs A (rank, {in_dims[name]}) and B ({out_dims[name]}, rank)")
            if not (a.is_floating_point() and b.is_floating_point()):
                raise VariantInvalid(f"variant {variant}: {prefix} is not floating point")
            rank = r if rank is None else rank
            if r != rank:
                raise VariantInvalid(f"variant {variant}: {prefix} has rank {r}, other adapters rank {rank}")
            layer[name] = (a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous())
            used.update((prefix + ".A", prefix + ".B"))
        layers.append(layer)
    extra = sorted(set(tensors) - used)
    if extra:
        raise VariantInvalid(f"variant {variant}: unexpected entry {extra[0]!r} (blocks beyond the model's {cfg.n_layers}?)")
    for layer in layers:
        for a, b in layer.values():
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise VariantInvalid(f"variant {variant}: the adapter holds NaN or infinite values")
    return Adapter(variant=variant, rank=rank, layers=layers)


def load_adapter_file(variant: str, path: Path, cfg, device, dtype, max_bytes: int) -> Adapter:
    size = path.stat().st_size
    if size > max_bytes:
        raise VariantInvalid(f"variant {variant}: the file is {size} bytes, more than VARIANT_MAX_MB allows")
    try:
        # weights_only: a pickle that asks to run code is refused, not run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        first_line = first_line.replace(str(path), "the file")[:200]  # no server paths in answers
        raise VariantInvalid(f"variant {variant}: not a loadable weights-only state dict ({first_line})") from None
    return adapter_from_state_dict(variant, state, cfg, device, dtype)


class VariantStore:
    """Finds, loads and keeps adapters for the scheduler (which runs on one thread).

    `status(id)` says whether a variant can be used now ("ready": loaded), must wait
    for its file to load ("loading") or to download first ("fetching"), or raises
    VariantNotFound / BadVariantId.  Loads and downloads run on background threads,
    never on the scheduler's: a step is not held up by reading an adapter file;
    `poll_pending()` reports the ones that ended (a download goes on to its load).
    `get(id)` returns a loaded adapter (loading it there only if it was evicted
    meanwhile)."""

    def __init__(self, cfg, device, dtype, directories: list[Path], max_count: int = 8,
                 max_bytes: int = 1 << 30, file_max_bytes: int = 512 << 20,
                 download_url: str = "", download_key: str = "", download_timeout: float = 60.0):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.directories = [Path(d) for d in directories if str(d)]
        self.max_count, self.max_bytes, self.file_max_bytes = max_count, max_bytes, file_max_bytes
        self.download_url, self.download_key, self.download_timeout = download_url.rstrip("/"), download_key, download_timeout
        self.loaded: collections.OrderedDict[str, Adapter] = collections.OrderedDict()
        self.bytes = 0
        self.loads = 0
        self.evictions = 0
        self._downloads: dict[str, concurrent.futures.Future] = {}
        self._loads: dict[str, concurrent.futures.Future] = {}  # id -> its Adapter, read off the scheduler's thread
        self._failed: collections.OrderedDict[str, tuple[float, VariantError]] = collections.OrderedDict()  # id -> (until, error)
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._available: tuple[float, list[str]] = (0.0, [])

    # -- lookup
    def path_of(self, variant: str) -> Optional[Path]:
        check_variant_id(variant)
        for directory in self.directories:
            path = directory / variant / "final.pt"
            if path.is_file():
                return path
        return None

    def available(self, max_age: float = 5.0, limit: int = 200) -> list[str]:
        """Variant ids with a file in the directories (rescanned at most every `max_age` s)."""
        scanned_at, ids = self._available
        if time.monotonic() - scanned_at < max_age:
            return ids
        found = set()
        for directory in self.directories:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if len(found) >= limit:
                    break
                try:
                    if check_variant_id(entry.name) and os.path.isfile(os.path.join(entry.path, "final.pt")):
                        found.add(entry.name)
                except BadVariantId:
                    continue
        ids = sorted(found)
        self._available = (time.monotonic(), ids)
        return ids

    def status(self, variant: str) -> str:
        check_variant_id(variant)
        if variant in self.loaded:
            return "ready"
        if variant in self._loads:
            return "loading"
        if variant in self._downloads:
            return "fetching"
        if self.path_of(variant) is not None:
            self._start_load(variant)
            return "loading"
        if self.download_url:
            failed = self._failed.get(variant)
            if failed is not None and failed[0] > time.monotonic():
                raise type(failed[1])(str(failed[1]))  # the same answer, no new call
            if len(self._downloads) >= MAX_DOWNLOADS:
                raise DownloadsBusy(f"variant {variant}: {MAX_DOWNLOADS} variant downloads are under way; try again shortly")
            self._start_download(variant)
            return "fetching"
        # the places looked in are the operator's business (logged), not the client's
        log.info("variant %s not found in %s", variant, ", ".join(str(d) for d in self.directories) or "no directory")
        raise VariantNotFound(f"variant {variant} is not available on this server")

    def get(self, variant: str) -> Adapter:
        adapter = self.loaded.get(variant)
        if adapter is not None:
            self.loaded.move_to_end(variant)
            return adapter
        path = self.path_of(variant)
        if path is None:
            raise VariantNotFound(f"variant {variant} is not available on this server")
        adapter = load_adapter_file(variant, path, self.cfg, self.device, self.dtype, self.file_max_bytes)
        self._keep(adapter)
        self.loads += 1
        log.info("loaded variant %s (rank %d, %.1f MB)", variant, adapter.rank, adapter.bytes() / 1e6)
        return adapter

    def _keep(self, adapter: Adapter) -> None:
        size = adapter.bytes()
        # the oldest go first; the new one stays even when it alone is over the budget
        while self.loaded and (len(self.loaded) >= self.max_count or self.bytes + size > self.max_bytes):
            _, old = self.loaded.popitem(last=False)
            self.bytes -= old.bytes()
            self.evictions += 1
        self.loaded[adapter.variant] = adapter
        self.bytes += size

    def _start_load(self, variant: str) -> None:
        self._loads[variant] = self._background().submit(self._load, variant)

    def _load(self, variant: str) -> Adapter:
        path = self.path_of(variant)
        if path is None:
            raise VariantNotFound(f"variant {variant} is not available on this server")
        return load_adapter_file(variant, path, self.cfg, self.device, self.dtype, self.file_max_bytes)

    def _background(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="variant-io")
        return self._pool

    # -- downloads (off unless VARIANT_DOWNLOAD_URL is set)
    def _start_download(self, variant: str) -> None:
        self._downloads[variant] = self._background().submit(self._download, variant)

    def _download(self, variant: str) -> None:
        target_dir = self.directories[0] / variant if self.directories else None
        if target_dir is None:
            raise VariantNotFound(f"variant {variant}: no directory to download into")
        url = f"{self.download_url}/v1/variants/{variant}/download"
        headers = {"X-Moondream-Auth": self.download_key} if self.download_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.download_timeout) as r:
                declared = r.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.file_max_bytes:
                    raise VariantInvalid(f"variant {variant}: the download is {declared} bytes, over VARIANT_MAX_MB")
                data = r.read(self.file_max_bytes + 1)
        except urllib.error.HTTPError as err:
            raise VariantNotFound(f"variant {variant} could not be downloaded (HTTP {err.code})") from None
        except (urllib.error.URLError, OSError) as err:
            raise VariantNotFound(f"variant {variant} could not be downloaded ({getattr(err, 'reason', err)})") from None
        if len(data) > self.file_max_bytes:
            raise VariantInvalid(f"variant {variant}: the download is larger than VARIANT_MAX_MB")
        target_dir.mkdir(parents=True, exist_ok=True)
        # written whole and checked, then renamed: a half-written or unusable file is never found as final.pt
        with tempfile.NamedTemporaryFile(dir=target_dir, delete=False, suffix=".part") as tmp:
            tmp.write(data)
        try:
            load_adapter_file(variant, Path(tmp.name), self.cfg, "cpu", torch.float32, self.file_max_bytes)
            os.replace(tmp.name, target_dir / "final.pt")
        finally:
            Path(tmp.name).unlink(missing_ok=True)
        log.info("downloaded variant %s (%d bytes)", variant, len(data))

    def poll_pending(self) -> list[tuple[str, Optional[VariantError]]]:
        """Variants whose wait ended since the last call: (variant, None) once loaded, or
        (variant, error).  Runs on the scheduler's thread: only it changes `loaded`."""
        done = []
        for variant, future in list(self._loads.items()):
            if future.done():
                del self._loads[variant]
                err = future.exception()
                if err is None:
                    self._keep(future.result())
                    self.loads += 1
                    adapter = self.loaded[variant]
                    log.info("loaded variant %s (rank %d, %.1f MB)", variant, adapter.rank, adapter.bytes() / 1e6)
                elif not isinstance(err, VariantError):
                    log.warning("variant %s: load failed: %r", variant, err)
                    err = VariantInvalid(f"variant {variant} could not be loaded ({type(err).__name__})")
                done.append((variant, err))
        for variant, err in self._poll_downloads():
            if err is None:
                self._start_load(variant)  # reported once loaded
            else:
                done.append((variant, err))
        return done

    def _poll_downloads(self) -> list[tuple[str, Optional[VariantError]]]:
        """Downloads that ended since the last call: (variant, None) or (variant, error)."""
        done = []
        for variant, future in list(self._downloads.items()):
            if future.done():
                del self._downloads[variant]
                err = future.exception()
                if err is not None and not isinstance(err, VariantError):
                    log.warning("variant %s: download failed: %r", variant, err)
                    err = VariantNotFound(f"variant {variant} could not be downloaded ({type(err).__name__})")
                if err is not None:
                    self._remember_failure(variant, err)
                done.append((variant, err))
        return done

    def _remember_failure(self, variant: str, err: VariantError) -> None:
        self._failed[variant] = (time.monotonic() + FAILED_DOWNLOAD_TTL_S, err)
        self._failed.move_to_end(variant)
        while len(self._failed) > MAX_FAILED_REMEMBERED:
            self._failed.popitem(last=False)

    def stats(self) -> dict:
        return {"variants_loaded": len(self.loaded), "variant_bytes": self.bytes, "variant_loads": self.loads,
                "variant_evictions": self.evictions}
