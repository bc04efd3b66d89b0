"""Throughput and latency of the whole service (HTTP) against the engine in-process.

    .venv/bin/python -m bench.serve --requests 64 --concurrency 16

Starts the stack under supervisord on free ports (tests/stack.py), sends the
same mix of requests both ways with the same number in flight, and prints
requests/s and latency percentiles for each plus their ratio.

Both sides do the same work inside their timed windows: the JPEG files are made
before either timer starts (that is the client's work, not the service's), and
every request's JPEG is decoded and tiled inside the window: by the stack's
preprocess workers, and in process by a pool of as many processes.  What the ratio
leaves is the cost of serving over HTTP: the front end, base64 and JSON, the
broker's ZeroMQ hops and the separate processes.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import multiprocessing
import os
import statistics
import time
import urllib.request
import uuid

from PIL import Image

from gpu_worker.engine import load_model
from gpu_worker.engine_types import EngineRequest, Failed, Finished, ImageInput
from gpu_worker.scheduler import Scheduler
from preprocess_worker.worker import preprocess
from shared.protocol import PARAMS_OF_SKILL, SamplingSettings
from tests.stack import REPO, config_from_env, running_stack

IMAGE_DIR = REPO / "tests/conformance/main/images"


def workload(n: int, max_tokens: int) -> list[dict]:
    """n API request bodies cycling over the fixture images and the four skills."""
    images = sorted(os.listdir(IMAGE_DIR))
    settings = {"temperature": 0, "max_tokens": max_tokens, "max_objects": 4}
    bodies = []
    for i in range(n):
        image = images[i % len(images)]
        skill = ("caption", "query", "detect", "point")[i % 4]
        params = {"caption": {"length": "short"}, "query": {"question": f"What is shown? ({i})"},
                  "detect": {"object": "face"}, "point": {"object": "eye"}}[skill]
        bodies.append({"skill": skill, "image": image, "params": params, "settings": settings})
    return bodies


def jpeg_bytes(name: str) -> bytes:
    with Image.open(IMAGE_DIR / name) as im:
        out = io.BytesIO()
        im.convert("RGB").save(out, "JPEG", quality=95)
        return out.getvalue()


def percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)

    def pick(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return {"p50": pick(50), "p90": pick(90), "p99": pick(99), "mean": statistics.fmean(ordered)}


def run_http(url: str, bodies: list[dict], jpegs: dict[str, bytes], concurrency: int) -> tuple[float, list[float]]:
    def one(body: dict) -> float:
        payload = {**body["params"], "settings": body["settings"],
                   "image_url": "data:image/jpeg;base64," + base64.b64encode(jpegs[body["image"]]).decode()}
        req = urllib.request.Request(f"{url}/v1/{body['skill']}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=300) as resp:
            resp.read()
        return time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, bodies))
    return time.perf_counter() - start, latencies


def run_in_process(scheduler: Scheduler, config, bodies: list[dict], jpegs: dict[str, bytes], concurrency: int,
                   decoders: concurrent.futures.Executor) -> tuple[float, list[float]]:
    """The same requests straight into a Scheduler, at most `concurrency` at a time;
    each request's JPEG is decoded and tiled by `decoders` (processes, as the stack's
    preprocess workers are) before it is added."""
    pending = list(bodies)
    decoding: dict[concurrent.futures.Future, tuple[dict, float]] = {}
    started: dict[str, float] = {}
    latencies: list[float] = []
    start = time.perf_counter()
    while pending or decoding or started:
        while pending and len(decoding) + len(started) < concurrency:
            body = pending.pop(0)
            job = decoders.submit(preprocess, jpegs[body["image"]], config.max_image_pixels, config.max_image_side)
            decoding[job] = (body, time.perf_counter())
        if decoding and not started:  # nothing to step: wait for an image
            concurrent.futures.wait(decoding, return_when=concurrent.futures.FIRST_COMPLETED)
        for job in [j for j in decoding if j.done()]:
            body, submitted = decoding.pop(job)
            done = job.result()
            rid = uuid.uuid4().hex
            params = PARAMS_OF_SKILL[body["skill"]](**body["params"])
            scheduler.add(EngineRequest(rid, body["skill"], params, SamplingSettings(**body["settings"]),
                                        image=ImageInput(crops=done.crops, tiling=done.tiling, key=done.key)))
            started[rid] = submitted
        for event in scheduler.step():
            if isinstance(event, (Finished, Failed)):
                latencies.append(time.perf_counter() - started.pop(event.request_id))
    return time.perf_counter() - start, latencies


def report(name: str, elapsed: float, latencies: list[float]) -> float:
    rps = len(latencies) / elapsed
    p = percentiles(latencies)
    print(f"{name:12s} {rps:8.2f} req/s   p50 {p['p50'] * 1000:8.1f} ms   p90 {p['p90'] * 1000:8.1f} ms   "
          f"p99 {p['p99'] * 1000:8.1f} ms   ({len(latencies)} requests in {elapsed:.1f} s)")
    return rps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--preprocess-workers", type=int, default=2)
    parser.add_argument("--model", default=str(REPO / "tests/conformance/main"), help="MOONDREAM_MODEL for both sides")
    parser.add_argument("--device", default=os.environ.get("MOONDREAM_DEVICE", "auto"))
    args = parser.parse_args()

    bodies = workload(args.requests, args.max_tokens)
    jpegs = {body["image"]: jpeg_bytes(body["image"]) for body in bodies}  # before both timers
    env = {"MOONDREAM_MODEL": args.model, "MOONDREAM_DEVICE": args.device, "HTTP_THREADS": max(32, args.concurrency + 4)}
    with running_stack(preprocess_workers=args.preprocess_workers, ready_timeout=600, **env) as stack:
        print(f"model {args.model} on {args.device}; {args.requests} requests, {args.concurrency} in flight, "
              f"max_tokens {args.max_tokens}")
        run_http(stack.url, bodies[: min(8, len(bodies))], jpegs, args.concurrency)  # warm-up (image caches, kernels)
        http = report("stack/HTTP", *run_http(stack.url, bodies, jpegs, args.concurrency))
        config = config_from_env(stack.env)
    # The stack is down now, so the in-process run has the machine to itself.
    scheduler = Scheduler(load_model(config), max_batch=config.batch_size, image_cache_bytes=config.image_cache_mb << 20)
    # Decoding processes started (spawned: no copy of the model's threads) before the timer.
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.preprocess_workers, mp_context=spawn) as decoders:
        run_in_process(scheduler, config, bodies[: min(8, len(bodies))], jpegs, args.concurrency, decoders)  # warm-up
        direct = report("in-process", *run_in_process(scheduler, config, bodies, jpegs, args.concurrency, decoders))
    print(f"ratio        stack/in-process throughput = {http / direct:.2f}")


if __name__ == "__main__":
    main()
