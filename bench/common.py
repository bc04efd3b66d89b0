"""Shared by the engine benchmarks (bench/engine.py, bench/throughput.py): loading
a model for benchmarking, the model's floors, the device's measured peaks, tables.

Every timing in bench/engine.py and bench/throughput.py is printed beside its
*floor*: the time the operation would take if the device ran at its peak.  A
floor has two parts and the larger one wins:

- compute: FLOPs / peak FLOP/s.  FLOPs = 2 x parameters touched x tokens, plus
  attention (2 x 2 x query positions x key positions x width per layer: QK^T and AV);
- memory: bytes / peak bytes/s.  Bytes = weights read once + KV-cache bytes read
  and written.  Activations are left out (they are small next to the weights
  at decode time, and prefill/vision work is compute-bound anyway).

The peaks are *measured in the same run* (a large matrix product in the
benchmark's dtype, a large memory copy and a large reduction), not spec-sheet
numbers, so the fraction of the floor says how close the engine is to what this
machine really does.  The model's sizes come from the loaded ModelConfig, so the
same code serves the full-size model and the tiny test model.
"""
from __future__ import annotations

import contextlib
import math
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

from gpu_worker.checkpoint import (TINY_CONFIG, Checkpoint, ModelConfig, _byte_level_tokenizer, resolve_device,
                                   resolve_dtype)
from gpu_worker.engine import Engine, load_model
from shared.config import Config

IMAGE_TOKENS = 729  # (378 / 14)^2 patches per crop, and image tokens per image
PREFIX_LEN = IMAGE_TOKENS + 1  # BOS + image tokens
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout


# --------------------------------------------------------------------- engines
# random:tiny with 2 vision layers instead of 27: at random:tiny's sizes the 729-token
# attention of every crop in every vision layer is most of a request's time on a
# CPU, and the throughput smoke test must be quick.
SMALL_CONFIG = {**TINY_CONFIG, "vision": {**TINY_CONFIG["vision"], "enc_n_layers": 2}}


def load_engine(model: str, device: str, dtype: str) -> Engine:
    """random:full / random:tiny / a checkpoint through the normal loader; random:small and
    random:overhead (Moondream 2's 24 text layers at tiny widths: bench/overhead.py) here."""
    if model == "random:overhead":
        from bench.overhead import overhead_engine

        return overhead_engine(device)
    if model != "random:small":
        # eager unless COMPILE=on is set: the benchmarks' history is eager (bench/overhead.py --compile
        # measures the compiled decode step), and compiling on a GPU would eat gpu.sh's time limits
        return load_model(Config(model=model, device=device, dtype=dtype, compile=os.environ.get("COMPILE", "off")))
    cfg = ModelConfig.from_json({"revision": "2025-06-21", **SMALL_CONFIG}, "2025-06-21")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, cfg.revision)
    gen = torch.Generator().manual_seed(1234)
    weights = {}
    for name, shape in cfg.weight_shapes().items():
        if ".ln" in name or "post_ln" in name:  # layer norms: identity
            t = torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        weights[name] = t.to(device=dev, dtype=dt)
    return Engine(Checkpoint(cfg, weights, _byte_level_tokenizer(cfg.vocab_size), model, test_model=True))


# --------------------------------------------------------------------- model sizes
def run_child(cmd: list, env: dict, cwd: str) -> dict:
    """Run a benchmark's child process and return the JSON of its last "RESULT " line."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{cwd}: {out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@contextlib.contextmanager
def baseline_tree(commit: str, with_venv: bool = False):
    """Yields a temporary git worktree of `commit` (None for "none"), removed afterwards.
    `with_venv` links this checkout's .venv into it (supervisord.conf runs <tree>/.venv)."""
    if commit == "none":
        yield None
        return
    tmp = tempfile.mkdtemp(prefix="bench-baseline-")
    subprocess.run(["git", "worktree", "add", "--detach", tmp, commit], cwd=ROOT, check=True, capture_output=True)
    try:
        if with_venv:
            os.symlink(os.path.join(ROOT, ".venv"), os.path.join(tmp, ".venv"))
        yield tmp
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=ROOT, capture_output=True)


def kv_sequences(engine, b: int, positions: int, prefix=None):
    """A KV pool with room for b sequences of `positions` positions, and the b sequences
    (each on `prefix`, a dense model.PrefixKV stored once in the pool, when given)."""
    block = 16
    per_sequence = -(-positions // block) + 1
    cache = engine.new_cache(b * per_sequence + (-(-prefix.length // block) if prefix is not None else 0), block)
    pooled = cache.store_prefix(prefix) if prefix is not None else None
    return cache, [cache.open_sequence(pooled, positions) for _ in range(b)]


def param_groups(cfg) -> dict[str, int]:
    """Parameter count per part of the model, read off ModelConfig.weight_shapes()."""
    groups = {"vision": 0, "projection": 0, "text_blocks": 0, "lm_head": 0, "embedding": 0, "other": 0}
    for name, shape in cfg.weight_shapes().items():
        n = math.prod(shape)
        if name.startswith("vision.proj_mlp"):
            groups["projection"] += n
        elif name.startswith("vision."):
            groups["vision"] += n
        elif name.startswith("text.blocks.") or name.startswith("text.post_ln"):
            groups["text_blocks"] += n
        elif name.startswith("text.lm_head"):
            groups["lm_head"] += n
        elif name == "text.wte":
            groups["embedding"] += n  # only the looked-up rows are read: left out of the floors
        else:
            groups["other"] += n  # region heads: not used by these benchmarks
    return groups


def kv_bytes_per_position(cfg, elt: int) -> int:
    """K and V of one position, all layers."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * elt


@dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def scaled(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.bytes * k)


def vision_cost(cfg, n_crops: int, elt: int) -> Cost:
    """Vision encoder over n_crops crops plus the projection of one image."""
    p = param_groups(cfg)
    tokens = n_crops * IMAGE_TOKENS
    attention = 4 * IMAGE_TOKENS * IMAGE_TOKENS * cfg.enc_dim * cfg.enc_n_layers * n_crops
    flops = 2 * p["vision"] * tokens + attention + 2 * p["projection"] * IMAGE_TOKENS
    return Cost(flops, (p["vision"] + p["projection"]) * elt)


def prefix_cost(cfg, elt: int) -> Cost:
    """The [BOS, image] prefill: 730 positions, bidirectional attention, KV written."""
    p = param_groups(cfg)
    attention = 4 * PREFIX_LEN * PREFIX_LEN * cfg.dim * cfg.n_layers
    flops = 2 * p["text_blocks"] * PREFIX_LEN + attention
    return Cost(flops, p["text_blocks"] * elt + PREFIX_LEN * kv_bytes_per_position(cfg, elt))


def image_encode_cost(cfg, n_crops: int, elt: int) -> Cost:
    return vision_cost(cfg, n_crops, elt) + prefix_cost(cfg, elt)


def text_step_cost(cfg, batch: int, new_tokens: int, context_before: int, elt: int,
                   logit_rows: int | None = None) -> Cost:
    """One text forward: `batch` sequences each feeding `new_tokens` positions after
    `context_before` cached ones (causal), then lm_head on `logit_rows` rows (default:
    one per sequence, as the scheduler samples only the last position)."""
    p = param_groups(cfg)
    logit_rows = batch if logit_rows is None else logit_rows
    # keys each new position attends to: context_before + its own index (1-based)
    key_positions = new_tokens * context_before + new_tokens * (new_tokens + 1) / 2
    attention = 4 * batch * key_positions * cfg.dim * cfg.n_layers
    flops = 2 * p["text_blocks"] * batch * new_tokens + attention + 2 * p["lm_head"] * logit_rows
    kv = batch * (context_before + new_tokens) * kv_bytes_per_position(cfg, elt)  # read all, write the new ones
    return Cost(flops, (p["text_blocks"] + p["lm_head"]) * elt + kv)


# --------------------------------------------------------------------- device peaks
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn(), one entry per timed repetition (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


@dataclass
class Peaks:
    flops: float  # FLOP/s of a large matrix product in the benchmark's dtype
    bandwidth: float  # bytes/s: the better of copy (read + write counted) and read-only reduction
    copy_bandwidth: float
    read_bandwidth: float
    matmul_n: int
    dtype: str

    def floor_s(self, cost: Cost) -> tuple[float, float]:
        """(compute floor, memory floor) in seconds."""
        return cost.flops / self.flops, cost.bytes / self.bandwidth

    def as_dict(self) -> dict:
        return {"matmul_flops_per_s": self.flops, "bandwidth_bytes_per_s": self.bandwidth,
                "copy_bytes_per_s": self.copy_bandwidth, "read_bytes_per_s": self.read_bandwidth,
                "matmul_n": self.matmul_n, "dtype": self.dtype}


def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool = False) -> Peaks:
    """Matmul FLOP/s and memory GB/s of this device, measured now."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else (1024 if quick else 4096)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm = min(time_it(lambda: torch.mm(a, b), device, reps=10 if cuda else (1 if quick else 3), warmup=2 if cuda else 1))
    del a, b

    # well beyond any cache: 2 GiB on a GPU (50-60 MB of L2), 512 MiB on a CPU
    nbytes = (2 << 30) if cuda else ((32 << 20) if quick else (512 << 20))
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    reps = 10 if cuda else 3
    copy = min(time_it(lambda: dst.copy_(src), device, reps=reps))
    read = min(time_it(lambda: src.sum(), device, reps=reps))
    del src, dst
    copy_bw, read_bw = 2 * nbytes / copy, nbytes / read
    return Peaks(flops=2 * n ** 3 / mm, bandwidth=max(copy_bw, read_bw), copy_bandwidth=copy_bw,
                 read_bandwidth=read_bw, matmul_n=n, dtype=str(dtype).replace("torch.", ""))


def best_peaks(samples: list[Peaks]) -> Peaks:
    """The best of several peak measurements.  On a shared machine other processes
    slow some of them down; the best is the closest to what the hardware does, and
    gives the strictest floors."""
    best = max(samples, key=lambda p: p.flops)
    return Peaks(flops=best.flops, bandwidth=max(p.bandwidth for p in samples),
                 copy_bandwidth=max(p.copy_bandwidth for p in samples),
                 read_bandwidth=max(p.read_bandwidth for p in samples), matmul_n=best.matmul_n, dtype=best.dtype)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch threads"


def code_version() -> str:
    """The commit benchmarked, plus "+dirty" when gpu_worker/ has uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "gpu_worker"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 3) -> str:
    """Short human number: 3 significant digits, no exponent for everyday sizes."""
    if x != x:  # NaN
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:,.{decimals}f}"


def save_json(path, data) -> None:
    """Write a benchmark's results (the --json option), when a path is given."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
