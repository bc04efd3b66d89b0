"""Engine-level benchmark: the model's three kinds of work, each beside its floor.

    python bench/engine.py --device cpu                      # full-size random weights, float32
    python bench/engine.py --device cuda --dtype bfloat16
    python bench/engine.py --model random:tiny --quick       # seconds; for the smoke test

Measured, on full-size random weights (the real Moondream 2 geometry, so the
arithmetic and memory traffic are those of the real model):

- image encode by crop count: vision encoder over all crops + projection + the
  730-position [BOS, image] prefix prefill (Engine.encode_images, one image);
- prompt prefill: a 16-token prompt after an image prefix, plus lm_head on its
  last position (what the scheduler does for a new request);
- decode: one step (forward + lm_head) at batch 1, 8, 32 with ~780 positions of
  context per sequence (730 image prefix + prompt + ~35 generated).

Beside each: FLOPs, bytes moved, the compute and memory floors at this device's
peaks (measured in this run: see bench/common.py) and the fraction of the floor
reached (floor / measured; 100% = the hardware's limit).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (PREFIX_LEN, Cost, best_peaks, code_version, describe_device, fmt,  # noqa: E402
                          image_encode_cost, kv_bytes_per_position, kv_sequences, load_engine, markdown_table, measure_peaks,
                          median, sync, text_step_cost, time_it)
from gpu_worker.engine_types import ImageInput  # noqa: E402
from gpu_worker.model import PrefixKV  # noqa: E402


def tiling_for(n_crops: int) -> tuple[int, int]:
    """(rows, cols) of the n_crops - 1 local crops, as square as possible (rows <= cols)."""
    local = n_crops - 1
    rows = max(r for r in range(1, int(local ** 0.5) + 1) if local % r == 0)
    return rows, local // rows


def synthetic_image(n_crops: int, seed: int = 0) -> ImageInput:
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, size=(n_crops, 378, 378, 3), dtype=np.uint8)
    return ImageInput(crops=crops, tiling=tiling_for(n_crops), key=f"bench-{n_crops}")


def mem_available_bytes() -> float:
    """MemAvailable from /proc/meminfo (inf where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def measurement(name: str, seconds: list[float], cost: Cost, extra: dict | None = None) -> dict:
    print(f"  {name}: {1e3 * median(seconds):.1f} ms", file=sys.stderr, flush=True)
    return {"name": name, "seconds": seconds, "cost": cost, "extra": extra or {}}


def result_row(m: dict, peaks) -> dict:
    """A measurement beside its floors at `peaks`."""
    name, seconds, cost, extra = m["name"], m["seconds"], m["cost"], m["extra"]
    t = median(seconds)
    compute_floor, memory_floor = peaks.floor_s(cost)
    floor = max(compute_floor, memory_floor)
    return {"what": name, "ms": t * 1e3, "reps": len(seconds), "gflop": cost.flops / 1e9, "gbytes": cost.bytes / 1e9,
            "compute_floor_ms": compute_floor * 1e3, "memory_floor_ms": memory_floor * 1e3,
            "bound": "compute" if compute_floor >= memory_floor else "memory",
            "fraction_of_floor": floor / t if t > 0 else float("nan"), "seconds": seconds, **extra}


def bench_image_encode(engine, crop_counts, reps, warmup, elt) -> list[dict]:
    rows = []
    for n in crop_counts:
        image = synthetic_image(n)
        seconds = time_it(lambda: engine.encode_images([image]), engine.device, reps=reps, warmup=warmup)
        rows.append(measurement(f"image encode, {n} crops {image.tiling[0]}x{image.tiling[1]}", seconds,
                                image_encode_cost(engine.config, n, elt), {"crops": n}))
    return rows


def random_prefix(engine) -> PrefixKV:
    """A prefix with the right shapes; its values do not change the arithmetic."""
    cfg = engine.config
    shape = (cfg.n_kv_heads, PREFIX_LEN, cfg.head_dim)
    make = lambda: torch.randn(shape, device=engine.device).to(engine.dtype)  # noqa: E731
    return PrefixKV(k=[make() for _ in range(cfg.n_layers)], v=[make() for _ in range(cfg.n_layers)])


def bench_prompt_prefill(engine, prompt_len, reps, warmup, elt) -> dict:
    cache, seqs = kv_sequences(engine, 1, PREFIX_LEN + prompt_len + 8, random_prefix(engine))
    ids = torch.randint(1, engine.config.vocab_size, (prompt_len,)).tolist()

    def step():
        # every repetition writes the same positions 730..745 again: same work each time
        hidden = engine.forward(engine.embed_tokens(ids).view(1, prompt_len, -1), [PREFIX_LEN], seqs, cache)
        engine.logits(hidden)

    seconds = time_it(step, engine.device, reps=reps, warmup=warmup)
    return measurement(f"prompt prefill, {prompt_len} tokens after the image", seconds,
                       text_step_cost(engine.config, 1, prompt_len, PREFIX_LEN, elt), {"tokens": prompt_len})


def bench_decode(engine, batches, context, reps, warmup, elt) -> list[dict]:
    rows = []
    cfg = engine.config
    for b in batches:
        cache_context = context + 8  # just what the benchmark touches: float32 full-size KV is ~0.4 MB/position
        need = b * cache_context * kv_bytes_per_position(cfg, elt)
        if engine.device.type == "cpu" and need * 1.15 > mem_available_bytes():
            print(f"  decode batch {b}: skipped, its KV cache ({need / 2**30:.1f} GiB) does not fit in free memory",
                  file=sys.stderr)
            continue
        ids = torch.randint(1, cfg.vocab_size, (b,)).tolist()
        cache = None
        try:
            cache, seqs = kv_sequences(engine, b, cache_context)

            def step():
                # same position each time: the context stays at `context` keys per sequence
                hidden = engine.forward(engine.embed_tokens(ids).view(b, 1, -1), [context - 1] * b, seqs, cache)
                engine.logits(hidden)

            seconds = time_it(step, engine.device, reps=reps, warmup=warmup)
            cost = text_step_cost(cfg, b, 1, context - 1, elt)
            rows.append(measurement(f"decode step, batch {b}, {context} ctx", seconds, cost,
                                    {"batch": b, "context": context,
                                     "tokens_per_s": b / median(seconds), "kv_cache_gib": cache.bytes() / 2**30}))
        except (RuntimeError, MemoryError) as err:  # e.g. out of GPU memory: report it, go on with the rest
            print(f"  decode batch {b}: failed: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        del cache
        gc.collect()
        sync(engine.device)
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def profile_decode(engine, batches, context, path: str) -> list[str]:
    """torch.profiler over one decode step per batch size: which ops take the time,
    and how much of the step's wall time the device spends in kernels (on a GPU, the
    rest is Python and kernel-launch overhead).  Writes the op tables to `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    summary, tables = [], []
    for b in batches:
        cache, seqs = kv_sequences(engine, b, context + 8)
        ids = list(range(1, b + 1))

        def step():
            embeds = engine.embed_tokens(ids).view(b, 1, -1)
            engine.logits(engine.forward(embeds, [context - 1] * b, seqs, cache))

        for _ in range(3):
            step()
        sync(engine.device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            step()
            sync(engine.device)
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        if cuda:
            key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
            busy = sum(getattr(e, key) for e in events) / 1e6
        else:
            key, busy = "self_cpu_time_total", float("nan")
        launches = sum(e.count for e in events if e.key.startswith("aten::"))
        busy_text = f", GPU busy {busy * 1e3:.2f} ms" if cuda else ""
        line = f"decode batch {b}: wall {wall * 1e3:.2f} ms (under the profiler){busy_text}, {launches} aten calls"
        summary.append(line)
        tables.append(f"## {line}\n\n" + events.table(sort_by=key, row_limit=25))
        del cache
    with open(path, "w") as f:
        f.write("\n\n".join(tables) + "\n")
    return summary


def print_report(results: dict) -> None:
    peaks, info = results["peaks"], results["setup"]
    print(f"\n### Engine benchmark: {info['model']} on {info['device_name']} ({info['dtype']})\n")
    samples = ", ".join(f"{fmt(p['matmul_flops_per_s'] / 1e9)} GFLOP/s + {fmt(p['bandwidth_bytes_per_s'] / 1e9)} GB/s"
                        for p in results["peak_samples"])
    print(f"Peaks measured in this run (best of start and end: {samples}): "
          f"matmul {fmt(peaks['matmul_flops_per_s'] / 1e9)} GFLOP/s "
          f"({peaks['matmul_n']}^3, {peaks['dtype']}); memory {fmt(peaks['bandwidth_bytes_per_s'] / 1e9)} GB/s "
          f"(copy {fmt(peaks['copy_bytes_per_s'] / 1e9)} GB/s counting read+write, "
          f"read-only sum {fmt(peaks['read_bytes_per_s'] / 1e9)} GB/s).  "
          f"Model load {info['load_s']:.1f} s; weights {fmt(info['weights_gib'])} GiB.  "
          f"Load average at start / end: {info['load_average_at_start'][0]:.2f} / "
          f"{info['load_average_at_end'][0]:.2f}.\n")
    header = ["what", "measured ms", "reps", "GFLOP", "GB moved", "compute floor ms", "memory floor ms",
              "bound", "% of floor", "tokens/s"]
    rows = []
    for r in results["rows"]:
        rows.append([r["what"], fmt(r["ms"]), r["reps"], fmt(r["gflop"]), fmt(r["gbytes"]),
                     fmt(r["compute_floor_ms"]), fmt(r["memory_floor_ms"]), r["bound"],
                     f"{100 * r['fraction_of_floor']:.0f}%", fmt(r["tokens_per_s"]) if "tokens_per_s" in r else ""])
    print(markdown_table(header, rows))
    print()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:full",
                    help="random:full (default), random:tiny, random:small or a checkpoint")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="auto",
                    help="auto (float32 on CPU, bfloat16 on CUDA), bfloat16, float16, float32")
    ap.add_argument("--crops", help="crop counts for the image encode (default: 2,5 on CPU, 2,5,10,13 on CUDA)")
    ap.add_argument("--batches", help="decode batch sizes (default: 1,8,32 on CPU, 1,8,32,64 on CUDA)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens for the prefill measurement")
    ap.add_argument("--context", type=int, default=PREFIX_LEN + 50,
                    help="context positions per sequence while decoding")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 crops, batches 1,2, one repetition each, small peak measurements")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--profile", help="also profile one decode step at the smallest and largest batch; op tables here")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if args.quick:
        default_crops, default_batches = "2", "1,2"
    else:
        default_crops, default_batches = ("2,5,10,13", "1,8,32,64") if cuda else ("2,5", "1,8,32")
    crop_counts = [int(x) for x in (args.crops or default_crops).split(",")]
    batches = [int(x) for x in (args.batches or default_batches).split(",")]
    # CPU: a 13-crop encode of the full model is ~10 TFLOP (minutes on 2 cores), so one
    # timed run and no warm-up there; GPU: warm up, then take the median of several
    if args.quick:
        enc_reps, enc_warm, text_reps, text_warm = 1, 0, 1, 1
    elif cuda:
        enc_reps, enc_warm, text_reps, text_warm = 5, 2, 20, 3
    else:
        enc_reps, enc_warm, text_reps, text_warm = 1, 0, 2, 1

    load_at_start = os.getloadavg()
    t0 = time.perf_counter()
    engine = load_engine(args.model, args.device, args.dtype)
    sync(engine.device)
    load_s = time.perf_counter() - t0
    elt = torch.tensor([], dtype=engine.dtype).element_size()
    # peaks measured before and after the benchmark; the better of the two is used
    peak_samples = [measure_peaks(engine.device, engine.dtype, quick=args.quick)]
    print(f"loaded {args.model} in {load_s:.1f} s; peaks {peak_samples[0].flops / 1e9:.1f} GFLOP/s, "
          f"{peak_samples[0].bandwidth / 1e9:.1f} GB/s", file=sys.stderr, flush=True)

    measured = bench_image_encode(engine, crop_counts, enc_reps, enc_warm, elt)
    measured.append(bench_prompt_prefill(engine, args.prompt, text_reps, text_warm, elt))
    measured += bench_decode(engine, batches, args.context, text_reps, text_warm, elt)
    peak_samples.append(measure_peaks(engine.device, engine.dtype, quick=args.quick))
    peaks = best_peaks(peak_samples)
    rows = [result_row(m, peaks) for m in measured]

    weights_bytes = sum(t.numel() * t.element_size() for t in engine.weights.values())
    results = {
        "setup": {"model": args.model, "device": str(engine.device), "device_name": describe_device(engine.device),
                  "dtype": str(engine.dtype).replace("torch.", ""), "torch": torch.__version__, "code": code_version(),
                  "load_s": load_s, "weights_gib": weights_bytes / 2**30, "quick": args.quick,
                  # other processes on the machine skew CPU timings: keep the evidence
                  "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "peaks": peaks.as_dict(),
        "peak_samples": [p.as_dict() for p in peak_samples],
        "rows": rows,
    }
    if args.profile:
        results["profile"] = profile_decode(engine, sorted({min(batches), max(batches)}), args.context, args.profile)
    print_report(results)
    for line in results.get("profile", []):
        print(f"Profile: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
