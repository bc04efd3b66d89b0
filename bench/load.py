"""Load generator against the HTTP API, with the seed's design (BATCH_SIZE=1) as the
baseline in the same run.

    python bench/load.py                                  # decode-heavy, concurrency 16, both settings
    python bench/load.py --workload mixed --rate 4 --seconds 60
    python bench/load.py --url http://host:5000 --no-baseline   # against a running service

Without --url it starts the whole stack (real supervisord, tests/stack.py) on free
ports with the tiny test model, once per BATCH_SIZE setting, and runs the same
request list against each.  Reported per setting: requests/s, output tokens/s, and
percentiles of time to first token (TTFT), time per output token (TPOT), the gap
between streamed chunks and end-to-end latency.  Text requests are streamed (SSE) so
these are measured as a client sees them.  A streamed chunk is several tokens (the
text is flushed up to its last space), so the chunk gap is not a per-token figure;
TPOT is: (end-to-end - TTFT) / (output tokens - 1) of each request.  The warm-up
before each timed run uses images that the timed run never sends.

Arrivals: `--concurrency N` keeps N requests in flight (closed loop); `--rate R`
sends R requests/s on a Poisson schedule (open loop) with at most --concurrency in
flight.  Workloads:
- decode-heavy: small images (a few distinct ones, so their encodings are
  reused), 128-token captions at temperature 0.5;
- mixed: caption / query / detect / point, small to 9-crop images, 16 to 128 tokens.
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.parse
import http.client
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402


# ---------------------------------------------------------------- workload
def synthetic_image(width: int, height: int, seed: int) -> str:
    """A noisy PNG as a data URL (noise: distinct pixels, so distinct cache keys)."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (width, height), bytes(rng.getrandbits(8) for _ in range(width * height * 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# The warm-up's image seeds start here, far above any the timed run uses, so no
# timed request finds its image already encoded by the warm-up.
WARMUP_IMAGE_SEEDS = 1_000_000


def make_requests(workload: str, n: int, seed: int, distinct_images: bool,
                  image_seeds: int = 0) -> list[tuple[str, dict]]:
    """n request bodies; every image is seeded from `image_seeds` upwards (pool images
    first, then one per request with --distinct-images)."""
    rng = random.Random(seed)
    if workload == "decode-heavy":
        pool = [synthetic_image(96, 64, image_seeds + i) for i in range(4)]
        out = []
        for i in range(n):
            image = synthetic_image(96, 64, image_seeds + 1000 + i) if distinct_images else pool[i % len(pool)]
            out.append(("caption", {"image_url": image, "length": "long", "stream": True,
                                    "settings": {"temperature": 0.5, "top_p": 0.9, "max_tokens": 128}}))
        return out
    sizes = [(96, 64), (378, 378), (800, 600)]
    pool = [synthetic_image(w, h, image_seeds + i) for i, (w, h) in enumerate(sizes * 2)]
    out = []
    for i in range(n):
        image = synthetic_image(*sizes[i % 3], image_seeds + 2000 + i) if distinct_images else rng.choice(pool)
        skill = rng.choice(["caption", "query", "query", "detect", "point"])
        tokens = rng.choice([16, 32, 64, 128])
        if skill == "caption":
            body = {"image_url": image, "length": rng.choice(["short", "normal", "long"]), "stream": True,
                    "settings": {"max_tokens": tokens}}
        elif skill == "query":
            body = {"image_url": image, "question": rng.choice(["What is this?", "Describe the colours.", "How many?"]),
                    "stream": True, "settings": {"max_tokens": tokens}}
        else:
            body = {"image_url": image, "object": rng.choice(["cat", "red box", "person"]), "settings": {"max_objects": 5}}
        out.append((skill, body))
    return out


# ---------------------------------------------------------------- one request
@dataclass
class Sample:
    ok: bool
    status: int
    latency: float
    ttft: float | None = None
    chunk_gaps: list = field(default_factory=list)  # between streamed chunks (each several tokens)
    output_tokens: int = 0


def send(base_url: str, skill: str, body: dict, timeout: float = 600.0) -> Sample:
    parsed = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", f"/v1/{skill}", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return Sample(False, resp.status, time.perf_counter() - start)
        if resp.getheader("Content-Type", "").startswith("text/event-stream"):
            return _read_stream(resp, start)
        data = json.loads(resp.read())
        return Sample(True, 200, time.perf_counter() - start,
                      output_tokens=data.get("metrics", {}).get("output_tokens", 0))
    except (OSError, http.client.HTTPException, ValueError):
        return Sample(False, 0, time.perf_counter() - start)
    finally:
        conn.close()


def _read_stream(resp, start: float) -> Sample:
    ttft, last, chunk_gaps, tokens, ok, status = None, None, [], 0, False, 200
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: "):
            continue
        now = time.perf_counter()
        event = json.loads(line[6:])
        if event.get("completed"):
            ok = "error" not in event
            status = event.get("error", {}).get("status", 200)  # an error after the stream began
            tokens = event.get("metrics", {}).get("output_tokens", 0)
            break
        if event.get("chunk"):
            if ttft is None:
                ttft = now - start
            elif last is not None:
                chunk_gaps.append(now - last)
            last = now
    return Sample(ok, status, time.perf_counter() - start, ttft, chunk_gaps, tokens)


# ---------------------------------------------------------------- a run
def run_load(base_url: str, requests: list, concurrency: int, rate: float | None, seed: int) -> dict:
    samples: list[Sample] = []
    lock = threading.Lock()
    rng = random.Random(seed)

    def one(item):
        sample = send(base_url, *item)
        with lock:
            samples.append(sample)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        if rate:  # open loop: Poisson arrivals, the pool bounds what is in flight
            next_at = start
            for item in requests:
                next_at += rng.expovariate(rate)
                time.sleep(max(0.0, next_at - time.perf_counter()))
                pool.submit(one, item)
        else:
            list(pool.map(one, requests))
    elapsed = time.perf_counter() - start
    return summarize(samples, elapsed)


def pct(values: list, q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(samples: list[Sample], elapsed: float) -> dict:
    good = [s for s in samples if s.ok]
    gaps = [g for s in good for g in s.chunk_gaps]
    ttfts = [s.ttft for s in good if s.ttft is not None]
    tpots = [(s.latency - s.ttft) / (s.output_tokens - 1) for s in good if s.ttft is not None and s.output_tokens > 1]
    lat = [s.latency for s in good]
    failed = collections.Counter(str(s.status) for s in samples if not s.ok)  # "0": no HTTP answer at all
    return {
        "requests": len(samples), "ok": len(good), "errors": len(samples) - len(good), "seconds": round(elapsed, 2),
        "error_statuses": dict(failed),
        "req_per_s": len(good) / elapsed if elapsed else 0.0,
        "output_tok_per_s": sum(s.output_tokens for s in good) / elapsed if elapsed else 0.0,
        **{f"ttft_p{q}_ms": _ms(pct(ttfts, q)) for q in (50, 90, 99)},
        **{f"tpot_p{q}_ms": _ms(pct(tpots, q)) for q in (50, 90, 99)},
        **{f"chunk_gap_p{q}_ms": _ms(pct(gaps, q)) for q in (50, 90, 99)},
        **{f"e2e_p{q}_ms": _ms(pct(lat, q)) for q in (50, 90, 99)},
        "e2e_mean_ms": _ms(statistics.fmean(lat)) if lat else None,
    }


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


def table(rows: list[tuple[str, dict]]) -> str:
    cols = ["req_per_s", "output_tok_per_s", "ok", "errors", "ttft_p50_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p99_ms", "chunk_gap_p50_ms", "chunk_gap_p99_ms", "e2e_p50_ms", "e2e_p90_ms",
            "e2e_p99_ms"]
    lines = ["| setting | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else ("" if r[c] is None else str(r[c])) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running service; default: start one stack per setting")
    ap.add_argument("--workload", choices=["decode-heavy", "mixed"], default="decode-heavy")
    ap.add_argument("--distinct-images", action="store_true", help="every request its own image (no encode reuse)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rate", type=float, help="open loop: requests per second")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="BATCH_SIZE of the batched run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the BATCH_SIZE=1 run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    requests = make_requests(args.workload, args.requests, args.seed, args.distinct_images)
    warmup = make_requests(args.workload, min(8, args.concurrency), args.seed + 1, args.distinct_images,
                           image_seeds=WARMUP_IMAGE_SEEDS)
    settings = [("batched", args.batch_size)] + ([] if args.no_baseline or args.url else [("BATCH_SIZE=1", 1)])
    results = []
    for name, batch_size in settings:
        if args.url:
            run_load(args.url, warmup, args.concurrency, None, args.seed)
            results.append((name, run_load(args.url, requests, args.concurrency, args.rate, args.seed)))
            continue
        from tests.stack import running_stack

        with running_stack(BATCH_SIZE=str(batch_size), HTTP_THREADS=str(max(32, 2 * args.concurrency)),
                           REQUEST_TIMEOUT="600") as stack:
            run_load(stack.url, warmup, args.concurrency, None, args.seed)  # first requests load lazily
            results.append((f"{name} (BATCH_SIZE={batch_size})" if name == "batched" else name,
                            run_load(stack.url, requests, args.concurrency, args.rate, args.seed)))
        print(f"{results[-1][0]}: {results[-1][1]['req_per_s']:.2f} req/s", file=sys.stderr, flush=True)

    workload = f"{args.workload}{' distinct-images' if args.distinct_images else ''}, " \
               f"{'rate ' + str(args.rate) + '/s' if args.rate else 'closed loop'}, concurrency {args.concurrency}, " \
               f"{args.requests} requests"
    print(f"workload: {workload}")
    print(table(results))
    if len(results) == 2 and results[1][1]["req_per_s"]:
        print(f"\nbatched / BATCH_SIZE=1 requests/s: {results[0][1]['req_per_s'] / results[1][1]['req_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": workload, "results": dict(results)}, f, indent=1)


if __name__ == "__main__":
    main()
