"""The CPU ceiling of the non-GPU part of the stack: how many requests a second the front ends,
the broker and the preprocess workers can carry on a host with N cores, whatever the GPU does.

    .venv/bin/python -m bench.ceiling --requests 200 --cores 16

The workload of issue 14: one 1280x960 JPEG of ~380 KB (a data URL in a JSON body), a question,
answers of 3 tokens, the tiny test model (tests/conformance/main) on the CPU.  It starts a real
stack (supervisord, tests/stack.py), sends warm-up requests, then reads each process's CPU time
(utime + stime of /proc/<pid>/stat, every thread included) before and after `--requests`
requests and prints each process type's CPU milliseconds per request.  CPU time, not wall time:
the machine may be shared, and other jobs slow a process down without adding to its CPU time.

The same image every time: the GPU worker's image cache then spares it the vision encoder
(it is not what is measured), while the front end, broker and preprocess worker do their whole
work for every request (the broker does not know the image is cached: it is preprocessed and its
resized frame, what the GPU worker cuts the crops from, shipped each time).

Then the arithmetic for N cores with the default settings (shared/host_size.py): each
front end and preprocess worker is one process, at most one core busy; the broker is one; two
cores are kept for the broker and the GPU worker.  The ceiling is the smallest of

    front ends:          FRONTEND_WORKERS x 1000 / frontend ms
    broker:              1000 / broker ms
    preprocess workers:  PREPROCESS_WORKERS x 1000 / preprocess ms
    all CPUs:            (N - 1) x 1000 / (frontend + broker + preprocess ms)   (one core for the GPU worker)

Beside it, in this process: where a preprocess worker's time goes (decode, the two LANCZOS
resizes, the cache key), and base64 decoding of the data URL by the standard library and by
pybase64 (what the front end uses now).
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import time
import urllib.request

import numpy as np
import pybase64
from PIL import Image

from bench.common import save_json
from shared import host_size
from shared.image_tiling import (
    CROP_BYTES, CROP_SIZE, pixels_key, resize_for_tiling, resized_frame, resized_frame_size, select_tiling,
    split_resized_frame, tile_image,
)
from tests.stack import running_stack

TARGET_RPS = 2 * 62.8  # issue 14: twice what Moondream's own engine serves on one H100 on this workload
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IMAGE_SIZE = (1280, 960)
IMAGE_TARGET_BYTES = 380_000


def workload_jpeg() -> bytes:
    """A 1280x960 JPEG of about 380 KB: smooth shapes plus fine texture, as a photo has (seeded)."""
    rng = np.random.default_rng(14)
    w, h = IMAGE_SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(x / 97 + c) * np.cos(y / 71 - c) for c in (0.0, 1.3, 2.6)], axis=-1)
    texture = rng.normal(0, 1, (h, w, 3)).astype(np.float32)
    best = b""
    for amplitude in range(2, 40):  # the first texture strength that reaches the size
        pixels = np.clip(base + amplitude * texture, 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
        best = out.getvalue()
        if len(best) >= IMAGE_TARGET_BYTES:
            break
    return best


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def process_types(stack) -> dict[str, list[int]]:
    """Process type -> pids, from supervisord."""
    types: dict[str, list[int]] = {}
    for name in stack.states():
        kind = name.split(":")[0]
        if kind in ("frontend", "broker", "preprocess", "gpu_worker"):
            types.setdefault(kind, []).append(stack.pid(name))
    return types


def post(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url + "/v1/query", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def send(url: str, body: bytes, n: int, concurrency: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for answer in pool.map(lambda _: post(url, body), range(n)):
            assert "answer" in answer, answer


def in_process_costs(jpeg: bytes, data_url: str, repeats: int) -> dict[str, float]:
    """CPU ms of the preprocess steps and of base64 decoding, in this process (median of `repeats`)."""

    def cpu_ms(step) -> float:
        times = []
        for _ in range(repeats):
            start = time.process_time()
            step()
            times.append((time.process_time() - start) * 1000)
        return sorted(times)[len(times) // 2]

    image = Image.open(io.BytesIO(jpeg))
    image.load()
    rows, cols = select_tiling(image.height, image.width)
    local_size = (cols * 266 + 112, rows * 266 + 112)
    payload = data_url.partition(",")[2]
    resized = resize_for_tiling(image)
    frame = resized_frame(resized)
    return {
        "decode JPEG": cpu_ms(lambda: Image.open(io.BytesIO(jpeg)).load()),
        f"LANCZOS resize to {CROP_SIZE}x{CROP_SIZE} (global crop)": cpu_ms(lambda: image.resize((CROP_SIZE, CROP_SIZE), Image.LANCZOS)),
        f"LANCZOS resize to {local_size[0]}x{local_size[1]} (local crops)": cpu_ms(lambda: image.resize(local_size, Image.LANCZOS)),
        "tile_image (both resizes, cutting)": cpu_ms(lambda: tile_image(image)),
        "resized frame assembly (preprocess worker)": cpu_ms(lambda: resized_frame(resized)),
        "cutting the crops from the frame (GPU worker)": cpu_ms(lambda: split_resized_frame(frame, resized.tiling)),
        "pixels_key (sha256 of the pixels)": cpu_ms(lambda: pixels_key(image)),
        "base64, standard library": cpu_ms(lambda: base64.b64decode(payload, validate=True)),
        "base64, pybase64 (front end)": cpu_ms(lambda: pybase64.b64decode(payload, validate=True)),
    }


def ceiling(per_request_ms: dict[str, float], cores: int) -> tuple[float, list[tuple[str, str, float]]]:
    """(requests/s, [(limit, arithmetic, requests/s)]) for `cores` CPUs with the default settings."""
    frontends = host_size.default_frontend_workers(cores)
    preprocess = host_size.default_preprocess_workers(cores)
    fe, br, pp = per_request_ms["frontend"], per_request_ms["broker"], per_request_ms["preprocess"]
    limits = [
        ("front ends", f"{frontends} x 1000 / {fe:.2f} ms", frontends * 1000 / fe),
        ("broker", f"1 x 1000 / {br:.2f} ms", 1000 / br),
        ("preprocess workers", f"{preprocess} x 1000 / {pp:.2f} ms", preprocess * 1000 / pp),
        ("all CPUs but the GPU worker's", f"{cores - 1} x 1000 / ({fe:.2f} + {br:.2f} + {pp:.2f}) ms",
         (cores - 1) * 1000 / (fe + br + pp)),
    ]
    return min(rps for _, _, rps in limits), limits


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="measured requests")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--cores", type=int, default=16, help="the host the ceiling is computed for")
    parser.add_argument("--repeats", type=int, default=20, help="of each in-process step")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    jpeg = workload_jpeg()
    data_url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    body = json.dumps({"image_url": data_url, "question": "What is in the image?",
                       "settings": {"max_tokens": 3, "temperature": 0}}).encode()
    tiling = select_tiling(IMAGE_SIZE[1], IMAGE_SIZE[0])
    n_crops = 1 + tiling[0] * tiling[1]
    print(f"workload: {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG of {len(jpeg) / 1000:.0f} KB, body {len(body) / 1000:.0f} KB, "
          f"{n_crops} crops ({n_crops * CROP_BYTES / 1e6:.2f} MB) cut by the GPU worker from a resized frame of "
          f"{resized_frame_size(tiling) / 1e6:.2f} MB, 3-token answers, tiny model; "
          f"{args.requests} requests, {args.concurrency} at a time")

    with running_stack(preprocess_workers=2, FRONTEND_WORKERS=2, ready_timeout=300, TORCH_THREADS=1) as stack:
        send(stack.url, body, args.warmup, args.concurrency)
        pids = process_types(stack)
        before = {kind: [cpu_seconds(p) for p in group] for kind, group in pids.items()}
        started = time.monotonic()
        send(stack.url, body, args.requests, args.concurrency)
        wall = time.monotonic() - started
        after = {kind: [cpu_seconds(p) for p in group] for kind, group in pids.items()}
        assert process_types(stack) == pids, "a process was restarted during the measurement"
    # At least one clock tick (10 ms), so a short run cannot divide by zero below.
    per_request_ms = {kind: max(sum(after[kind]) - sum(before[kind]), 1 / CLOCK_TICKS) * 1000 / args.requests
                      for kind in pids}

    print("\n| process type | processes | CPU ms per request |\n|---|---|---|")
    for kind in ("frontend", "broker", "preprocess", "gpu_worker"):
        print(f"| {kind} | {len(pids[kind])} | {per_request_ms[kind]:.2f} |")
    print(f"(wall time {wall:.1f} s on a shared machine: not a measure of anything here)")

    steps = in_process_costs(jpeg, data_url, args.repeats)
    print("\n| step, in this process | CPU ms (median) |\n|---|---|")
    for step, ms in steps.items():
        print(f"| {step} | {ms:.2f} |")

    rps, limits = ceiling(per_request_ms, args.cores)
    print(f"\nceiling on {args.cores} cores with the default settings "
          f"(FRONTEND_WORKERS={host_size.default_frontend_workers(args.cores)}, "
          f"PREPROCESS_WORKERS={host_size.default_preprocess_workers(args.cores)}):")
    for what, arithmetic, limit_rps in limits:
        print(f"  {what:32s} {arithmetic:45s} = {limit_rps:7.1f} requests/s")
    verdict = "meets" if rps >= TARGET_RPS else "misses"
    print(f"  ceiling: {rps:.1f} requests/s; target 2 x 62.8 = {TARGET_RPS:.1f}: {verdict} it ({rps / TARGET_RPS:.2f}x)")

    result = {"requests": args.requests, "cores": args.cores, "cpu_ms_per_request": per_request_ms,
              "in_process_ms": steps, "limits": [{"what": w, "arithmetic": a, "rps": r} for w, a, r in limits],
              "ceiling_rps": rps, "target_rps": TARGET_RPS, "jpeg_bytes": len(jpeg)}
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
