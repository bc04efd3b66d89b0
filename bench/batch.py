"""Bulk jobs (the Batch API) against interactive load, in one run on one stack.

    python bench/batch.py                        # both measurements, 500 lines, concurrency 8
    python bench/batch.py --lines 100 --skip-fairness

Throughput: the same caption requests, first sent over HTTP by bench/load.py's
closed loop at --concurrency, then as one batch job with BATCH_IN_FLIGHT =
--concurrency (rounds alternate, to spread drift in the machine's load over
both, each job INTERACTIVE_LINGER_S after the HTTP round, when the broker no longer
narrows batch lines for it).  Reported: requests/s vs lines/s, and their ratio (goal >= 0.9).

Fairness: an open-loop interactive load (--rate queries/s, short answers) runs
for --seconds without a job, then again while a large caption job runs; the
ratio of the two p50 latencies is the cost the job puts on interactive users
(goal <= 1.5).  The batch worker only marks its lines BACKGROUND; the broker and
the GPU worker's scheduler let interactive requests go first (shared/priority.py).
On a CPU a decode step's time grows with the batch, so the
job's lines slow the interactive ones down in a way they would not on a GPU,
where a step costs about the same for 8 rows or 24.

Starts the whole stack (tests/stack.py, real supervisord) with the tiny test
model unless --url is given (then BATCH_IN_FLIGHT is whatever that server has).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from batch_cli.cli import BatchClient  # noqa: E402
from bench.common import code_version, describe_device, save_json  # noqa: E402
from bench.load import make_requests, run_load, synthetic_image  # noqa: E402
from shared.priority import INTERACTIVE_LINGER_S  # noqa: E402


def caption_requests(n: int, max_tokens: int, seed: int) -> list[tuple[str, dict]]:
    """bench/load.py's decode-heavy captions, not streamed, with a fixed token budget."""
    out = []
    for skill, body in make_requests("decode-heavy", n, seed, distinct_images=False):
        body = {**body, "stream": False, "settings": {**body["settings"], "max_tokens": max_tokens}}
        out.append((skill, body))
    return out


def as_lines(requests: list[tuple[str, dict]]) -> bytes:
    lines = []
    for i, (skill, body) in enumerate(requests):
        line = {"id": i, "skill": skill, "image": body["image_url"], "length": body["length"], "settings": body["settings"]}
        lines.append(json.dumps(line))
    return ("\n".join(lines) + "\n").encode()


def run_job(client: BatchClient, data: bytes, path: str, poll: float = 0.1) -> dict:
    """Submit, wait; lines/s from the upload's end to the job's last result (polled every `poll` s)."""
    with open(path, "wb") as f:
        f.write(data)
    job_id = client.submit(path, 8 << 20)["id"]
    start = time.perf_counter()
    while True:
        job = client.status(job_id)
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(poll)
    elapsed = time.perf_counter() - start
    done = job["progress"]["completed"]
    return {"lines": job["progress"]["total"], "ok": done, "failed": job["progress"]["failed"],
            "seconds": round(elapsed, 2), "lines_per_s": done / elapsed}


def throughput(url: str, client: BatchClient, args, tmp: str) -> dict:
    requests = caption_requests(args.lines, args.max_tokens, args.seed)
    data = as_lines(requests)
    run_load(url, requests[:args.concurrency], args.concurrency, None, args.seed)  # warm-up
    http_runs, job_runs = [], []
    for _ in range(args.rounds):
        http_runs.append(run_load(url, requests, args.concurrency, None, args.seed))
        print(f"  http: {http_runs[-1]['req_per_s']:.2f} req/s", file=sys.stderr, flush=True)
        # the HTTP round's requests were interactive: for INTERACTIVE_LINGER_S after the last
        # one the broker still narrows batch lines (the policy for interactive traffic); the
        # job's own throughput is measured once they are gone
        time.sleep(INTERACTIVE_LINGER_S + 0.5)
        job_runs.append(run_job(client, data, tmp))
        print(f"  job:  {job_runs[-1]['lines_per_s']:.2f} lines/s", file=sys.stderr, flush=True)
    http_rate = statistics.fmean(r["req_per_s"] for r in http_runs)
    job_rate = statistics.fmean(r["lines_per_s"] for r in job_runs)
    return {"http_req_per_s": [round(r["req_per_s"], 3) for r in http_runs],
            "job_lines_per_s": [round(r["lines_per_s"], 3) for r in job_runs],
            "http_errors": sum(r["errors"] for r in http_runs), "job_failed_lines": sum(r["failed"] for r in job_runs),
            "ratio": job_rate / http_rate if http_rate else None}


def interactive_requests(n: int, seed: int) -> list[tuple[str, dict]]:
    image = synthetic_image(96, 64, seed)
    return [("query", {"image_url": image, "question": "What is this?", "settings": {"max_tokens": 8, "temperature": 0}})
            for _ in range(n)]


def fairness(url: str, client: BatchClient, args, tmp: str) -> dict:
    n = max(4, int(args.rate * args.seconds))
    requests = interactive_requests(n, args.seed)
    run_load(url, requests[:4], 4, None, args.seed)  # warm-up
    alone = run_load(url, requests, 8, args.rate, args.seed)
    print(f"  interactive alone: p50 {alone['e2e_p50_ms']} ms", file=sys.stderr, flush=True)
    with open(tmp, "wb") as f:  # a job far longer than the measurement
        f.write(as_lines(caption_requests(args.fairness_lines, args.max_tokens, args.seed + 1)))
    job_id = client.submit(tmp, 8 << 20)["id"]
    while client.status(job_id)["progress"]["completed"] < 1:  # running at full width
        time.sleep(0.2)
    with_job = run_load(url, requests, 8, args.rate, args.seed)
    job = client.json("POST", f"/v1/batch/{job_id}/cancel")
    print(f"  interactive with a job: p50 {with_job['e2e_p50_ms']} ms", file=sys.stderr, flush=True)
    return {"alone": alone, "with_job": with_job, "job_lines_done_meanwhile": job["progress"]["completed"],
            "p50_ratio": with_job["e2e_p50_ms"] / alone["e2e_p50_ms"] if alone["e2e_p50_ms"] else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running service (default: start the stack with the tiny test model)")
    ap.add_argument("--api-key", default=os.environ.get("VLM_API_KEY"))
    ap.add_argument("--lines", type=int, default=500, help="lines of the throughput job (and HTTP requests)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8, help="HTTP concurrency = BATCH_IN_FLIGHT")
    ap.add_argument("--batch-size", type=int, default=32, help="BATCH_SIZE of the GPU worker")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rate", type=float, default=1.0, help="fairness: interactive queries per second")
    ap.add_argument("--seconds", type=float, default=30.0, help="fairness: length of each interactive run")
    ap.add_argument("--fairness-lines", type=int, default=2000)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-fairness", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-batch-{os.getpid()}.jsonl")

    def measure(url: str) -> dict:
        client = BatchClient(url, args.api_key)
        results = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "api_key")},
                   # the machine this script runs on (with --url, the server's may be another)
                   "setup": {"code": code_version(), "machine": describe_device(torch.device("cpu")),
                             "cpus": os.cpu_count(), "load_at_start": os.getloadavg()}}
        if not args.skip_throughput:
            results["throughput"] = throughput(url, client, args, tmp)
        if not args.skip_fairness:
            results["fairness"] = fairness(url, client, args, tmp)
        return results

    try:
        if args.url:
            results = measure(args.url)
        else:
            from tests.stack import running_stack

            with running_stack(BATCH_SIZE=args.batch_size, BATCH_IN_FLIGHT=args.concurrency, REQUEST_TIMEOUT=600,
                               HTTP_THREADS=max(32, 2 * args.concurrency)) as stack:
                with urllib.request.urlopen(stack.url + "/health", timeout=5):
                    pass
                results = measure(stack.url)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    t, f = results.get("throughput"), results.get("fairness")
    if t:
        print(f"throughput: HTTP {t['http_req_per_s']} req/s, job {t['job_lines_per_s']} lines/s, "
              f"ratio {t['ratio']:.2f} (goal >= 0.9)")
    if f:
        print(f"fairness: interactive p50 {f['alone']['e2e_p50_ms']} ms alone, {f['with_job']['e2e_p50_ms']} ms "
              f"with a job ({f['job_lines_done_meanwhile']} lines done meanwhile): ratio {f['p50_ratio']:.2f} (goal <= 1.5)")
    save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
