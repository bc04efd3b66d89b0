"""Engine-level throughput: the continuous-batching Scheduler, in process, no HTTP.

    python bench/throughput.py --device cuda --dtype bfloat16     # full-size random weights
    python bench/throughput.py --device cpu --small               # reduced model, few requests (tested)

Two workloads, each at concurrency 1 (one request at a time) and 8 / 32 / 64
(closed loop: as soon as a request finishes another joins, so that many are
always in flight):

- kestrel-3tok: a 9-crop image (2x4 local crops + global) and a short question,
  greedy, max_tokens 3: Kestrel's ChartQA-like "~3-token answer" workload;
- answer-30tok: the same with max_tokens 30.

Every request has its own image (distinct cache key, image cache off), so every
request pays the vision encoder, as with distinct ChartQA images.  The first
`concurrency` completions are a warm-up; the next `--requests` completions (or
what completes within `--seconds`) are timed, with the loop kept full throughout.

Beside req/s and output tokens/s: the fraction of the FLOP floor and of the
memory floor reached (per-request FLOPs and bytes x req/s over this device's
measured peaks; see bench/common.py), and Kestrel's published H100 numbers for
Moondream 2 where they exist.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (PREFIX_LEN, Cost, best_peaks, code_version, describe_device, fmt,  # noqa: E402
                          image_encode_cost, load_engine, markdown_table, measure_peaks, param_groups, sync,
                          text_step_cost)
from gpu_worker.engine_types import EngineRequest, Failed, Finished, ImageInput  # noqa: E402
from gpu_worker.scheduler import Scheduler  # noqa: E402
from shared.protocol import QueryParams, SamplingSettings  # noqa: E402

# A ChartQA-sized question.  The random checkpoints use a byte-level stand-in
# tokenizer (one token per byte), so this is 16 tokens: about what a real
# ChartQA question is in Moondream's tokenizer.
QUESTION = "Value of bar A? "
CROPS, TILING = 9, (2, 4)  # global crop + 2x4 local crops
QUICK_CROPS, QUICK_TILING = 2, (1, 1)  # --quick: global + one local crop
WORKLOADS = {"kestrel-3tok": 3, "answer-30tok": 30}  # name -> max_tokens
# Kestrel on one H100 with Moondream 2 (ChartQA images): req/s at batch 1 and batch 64
KESTREL_H100 = {("kestrel-3tok", 1): 41.9, ("kestrel-3tok", 64): 57.0,
                ("answer-30tok", 1): 16.2, ("answer-30tok", 64): 48.8}


def run_point(engine, max_tokens: int, concurrency: int, n_timed: int, max_seconds: float,
              crops: np.ndarray, tiling: tuple[int, int]) -> dict:
    """Closed loop at `concurrency`: warm up on the first `concurrency` completions,
    then time the next n_timed (or as many as finish within max_seconds)."""
    context = PREFIX_LEN + 64 + max_tokens + 8  # prefix + prompt + answer: what the KV slots need
    sched = Scheduler(engine, max_batch=concurrency, image_cache_bytes=0, context=context)
    # the Scheduler caps its KV slots at what memory holds; more requests then wait their turn
    submitted = 0
    added_at: dict[str, float] = {}

    def submit():
        nonlocal submitted
        rid = uuid.uuid4().hex
        image = ImageInput(crops=crops, tiling=tiling, key=f"bench-image-{submitted}")  # distinct image per request
        sched.add(EngineRequest(rid, "query", QueryParams(question=QUESTION), SamplingSettings(temperature=0, max_tokens=max_tokens),
                                image, seed=submitted))
        added_at[rid] = time.perf_counter()
        submitted += 1

    for _ in range(concurrency):
        submit()
    finished, timed = 0, []
    t_start = t_end = None
    while True:
        events = sched.step()
        sync(engine.device)
        now = time.perf_counter()
        for ev in events:
            if isinstance(ev, Failed):
                raise RuntimeError(f"request failed: {ev.message}")
            if not isinstance(ev, Finished):
                continue
            finished += 1
            if t_start is not None:
                timed.append({"latency_s": now - added_at[ev.request_id], **ev.metrics})
                t_end = now
            submit()  # keep `concurrency` requests in flight
        if t_start is None and finished >= concurrency:
            t_start = now  # warm-up over: one full round of requests has gone through
        # stop after n_timed completions, or at the time cap once something was timed
        if t_start is not None and (len(timed) >= n_timed or (timed and now - t_start > max_seconds)):
            break
    for rid in list(sched.running) + [r.request_id for r, _ in sched.waiting]:
        sched.abort(rid)
    elapsed = (t_end - t_start) if timed else float("nan")
    return {
        "concurrency": concurrency, "kv_slots": sched.max_batch, "requests": len(timed), "seconds": elapsed,
        "req_per_s": len(timed) / elapsed if timed else 0.0,
        "output_tokens_per_s": sum(m["output_tokens"] for m in timed) / elapsed if timed else 0.0,
        "mean_output_tokens": statistics.mean(m["output_tokens"] for m in timed) if timed else 0.0,
        "mean_input_tokens": statistics.mean(m["input_tokens"] for m in timed) if timed else 0.0,
        "p50_latency_ms": 1e3 * statistics.median(m["latency_s"] for m in timed) if timed else float("nan"),
        "p50_ttft_ms": statistics.median(m["ttft_ms"] for m in timed) if timed else float("nan"),
    }


def request_cost(cfg, elt: int, n_crops: int, prompt_len: int, out_tokens: float, concurrency: int,
                 images_per_forward: int) -> Cost:
    """FLOPs and bytes one request needs at best, with weight reads shared across the
    batch: vision weights by the images encoded together, text weights by the
    `concurrency` sequences that prefill/decode together.  KV traffic is per request.
    Decode steps: the first token comes from the prompt prefill, so out_tokens - 1."""
    p = param_groups(cfg)
    text_weights = (p["text_blocks"] + p["lm_head"]) * elt
    image = image_encode_cost(cfg, n_crops, elt)
    image_weights = (p["vision"] + p["projection"] + p["text_blocks"]) * elt
    cost = Cost(image.flops, (image.bytes - image_weights) + image_weights / min(concurrency, images_per_forward))
    forwards = [text_step_cost(cfg, 1, prompt_len, PREFIX_LEN, elt)]
    forwards += [text_step_cost(cfg, 1, 1, PREFIX_LEN + prompt_len + i, elt)
                 for i in range(max(0, round(out_tokens) - 1))]
    for f in forwards:
        cost += Cost(f.flops, (f.bytes - text_weights) + text_weights / concurrency)
    return cost


def print_report(results: dict) -> None:
    s, pk = results["setup"], results["peaks"]
    print(f"\n### Throughput: {s['model']} on {s['device_name']} ({s['dtype']}), Scheduler in process\n")
    print(f"{s['crops']}-crop image per request (distinct images, image cache off), greedy, question of "
          f"{s['prompt_tokens']} prompt tokens.  Peaks measured in this run (best of start and end): matmul "
          f"{fmt(pk['matmul_flops_per_s'] / 1e9)} GFLOP/s, memory {fmt(pk['bandwidth_bytes_per_s'] / 1e9)} GB/s.  "
          "'% FLOP floor' = req/s x FLOPs per request / peak FLOP/s; '% memory floor' likewise with the bytes "
          "a request needs when its batch shares the weight reads.  Kestrel: one H100, Moondream 2, ChartQA.  "
          f"Load average at start / end: {s['load_average_at_start'][0]:.2f} / {s['load_average_at_end'][0]:.2f}.\n")
    header = ["workload", "concurrency", "KV slots", "requests", "req/s", "output tok/s", "mean out tokens",
              "p50 latency ms",
              "GFLOP/req", "GB/req", "% FLOP floor", "% memory floor", "Kestrel H100 req/s"]
    rows = []
    for r in results["rows"]:
        anchor = KESTREL_H100.get((r["workload"], r["concurrency"]))
        rows.append([r["workload"], r["concurrency"], r["kv_slots"], r["requests"], fmt(r["req_per_s"]),
                     fmt(r["output_tokens_per_s"]),
                     fmt(r["mean_output_tokens"]), fmt(r["p50_latency_ms"]), fmt(r["gflop_per_request"]),
                     fmt(r["gbytes_per_request"]), f"{100 * r['flop_fraction']:.1f}%",
                     f"{100 * r['memory_fraction']:.1f}%", anchor if anchor is not None else ""])
    print(markdown_table(header, rows))
    print()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="default random:full (random:small with --small)")
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--dtype", default="auto",
                    help="auto (float32 on CPU, bfloat16 on CUDA), bfloat16, float16, float32")
    ap.add_argument("--small", action="store_true", help="CPU smoke mode: reduced model, few requests, concurrency 1,4")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2-crop images, concurrency 1,2, one timed request per point")
    ap.add_argument("--concurrency", help="comma-separated (default 1,8,32,64)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    ap.add_argument("--requests", type=int, help="timed completions per point (default max(64, 2 x concurrency))")
    ap.add_argument("--seconds", type=float, default=20.0, help="time cap per point (after warm-up)")
    ap.add_argument("--budget", type=float, help="seconds for the whole run: points not started by then are skipped, "
                    "so the table still prints inside an outer time limit")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or ("random:small" if args.small else "random:full")
    default_conc = "1,2" if args.quick else ("1,4" if args.small else "1,8,32,64")
    concurrencies = [int(x) for x in (args.concurrency or default_conc).split(",")]
    workloads = args.workloads.split(",")

    load_at_start = os.getloadavg()  # other processes on the machine skew CPU timings
    t0 = time.perf_counter()
    engine = load_engine(model, args.device, args.dtype)
    sync(engine.device)
    load_s = time.perf_counter() - t0
    elt = torch.tensor([], dtype=engine.dtype).element_size()
    # peaks measured before and after the benchmark; the better of the two is used
    peak_samples = [measure_peaks(engine.device, engine.dtype, quick=args.small)]
    print(f"loaded {model} in {load_s:.1f} s; peaks {peak_samples[0].flops / 1e9:.1f} GFLOP/s, "
          f"{peak_samples[0].bandwidth / 1e9:.1f} GB/s", file=sys.stderr, flush=True)
    n_crops, tiling = (QUICK_CROPS, QUICK_TILING) if args.quick else (CROPS, TILING)
    # one set of pixels for all requests: values do not change the arithmetic, keys keep images distinct
    crops = np.random.default_rng(0).integers(0, 256, size=(n_crops, 378, 378, 3), dtype=np.uint8)
    prompt_tokens = None

    rows = []
    for name in workloads:
        max_tokens = WORKLOADS[name]
        for c in concurrencies:
            if args.budget and time.perf_counter() - t0 > args.budget:
                print(f"  {name} c={c}: skipped, over the --budget of {args.budget:.0f} s", file=sys.stderr, flush=True)
                continue
            n = args.requests or (1 if args.quick else 4 if args.small else max(64, 2 * c))
            try:
                point = run_point(engine, max_tokens, c, n, args.seconds, crops, tiling)
            except (RuntimeError, MemoryError) as err:  # e.g. out of GPU memory: report it, go on with the rest
                print(f"  {name} c={c}: failed: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
                if engine.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            prompt_tokens = round(point["mean_input_tokens"]) - PREFIX_LEN  # input_tokens counts the image prefix
            cost = request_cost(engine.config, elt, n_crops, prompt_tokens, point["mean_output_tokens"], c,
                                images_per_forward=8)  # the Scheduler's default max_images_per_step
            point.update({"workload": name, "max_tokens": max_tokens, "gflop_per_request": cost.flops / 1e9,
                          "gbytes_per_request": cost.bytes / 1e9,
                          "kestrel_h100_req_per_s": KESTREL_H100.get((name, c))})
            rows.append(point)
            print(f"  {name} c={c}: {point['req_per_s']:.2f} req/s, {point['output_tokens_per_s']:.1f} output tok/s, "
                  f"p50 latency {point['p50_latency_ms']:.0f} ms over {point['requests']} requests",
                  file=sys.stderr, flush=True)
    peak_samples.append(measure_peaks(engine.device, engine.dtype, quick=args.small))
    peaks = best_peaks(peak_samples)
    for point in rows:
        point["flop_fraction"] = point["req_per_s"] * point["gflop_per_request"] * 1e9 / peaks.flops
        point["memory_fraction"] = point["req_per_s"] * point["gbytes_per_request"] * 1e9 / peaks.bandwidth

    results = {
        "setup": {"model": model, "device": str(engine.device), "device_name": describe_device(engine.device),
                  "dtype": str(engine.dtype).replace("torch.", ""), "torch": torch.__version__, "code": code_version(),
                  "load_s": load_s, "crops": n_crops, "tiling": tiling, "prompt_tokens": prompt_tokens,
                  "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "peaks": peaks.as_dict(),
        "peak_samples": [p.as_dict() for p in peak_samples],
        "rows": rows,
    }
    print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
