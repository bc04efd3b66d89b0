"""The GPU worker's CPU time per generated token over HTTP: issue 21's black-box bar.

    python bench/http_overhead.py                   # this tree against BASELINE, alternating rounds
    python bench/http_overhead.py --baseline none   # this tree only
    python bench/http_overhead.py --quick           # seconds; for the smoke test
    python bench/http_overhead.py --baseline none --env COMPILE=on   # a setting changed (compiles in the warm-up)

A checkpoint with Moondream 2's 24 text layers at tiny widths (bench/overhead.py's
`random:overhead`: dim 128, 2 vision layers, seeded random weights) is written to a
temporary directory and served by the real stack under supervisord (tests/stack.py)
with one torch thread (TORCH_THREADS=1) and every other GPU worker setting at its default
(HTTP_THREADS=40, so that 32 requests at once never meet the front end's in-flight limit).  Its
arithmetic is negligible, so the GPU worker's CPU time is host time: what a GPU
would wait on.

Each workload is sent twice: one request at a time, then 32 at once.  The number is
the GPU worker process's CPU time (user + system, all its threads, from
/proc/<pid>/stat) over the timed window, divided by the generated tokens the
responses report (`metrics.output_tokens`).  Workloads:

- `image`: /v1/query on one of four fixture images (their encodes are cached in a
  warm-up, so the window holds prefill of the question and decode: the rows read
  the image prefix, as served requests do);
- `text`: /v1/query without an image.

Each code tree (this one, the baseline commit in a temporary git worktree) runs in
its own subprocess and its own stack, alternating in rounds, so both see the same
machine load; ratios are this tree over the baseline.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "3667eda"  # main before the per-step host cuts of issue 21's second round
IMAGES = ("square_378.png", "photo_773x767.jpg", "landscape_800x600.png", "gray_500x400.png")
CONCURRENT = 32
BARS_MS = {1: 2.0, CONCURRENT: 0.46}  # the bars, ms of GPU worker CPU per token (default settings)


def write_checkpoint(directory: str) -> None:
    """random:overhead as a local checkpoint directory (config.json, model.safetensors, tokenizer.json)."""
    import torch
    from safetensors.torch import save_file

    from gpu_worker.checkpoint import TINY_CONFIG, ModelConfig

    text = {"dim": 128, "ff_dim": 256, "n_layers": 24, "vocab_size": 512, "n_heads": 2, "n_kv_heads": 2}
    raw = {"revision": "2025-06-21", **TINY_CONFIG, "text": text,
           "vision": {**TINY_CONFIG["vision"], "enc_n_layers": 2}}
    cfg = ModelConfig.from_json(raw, "2025-06-21")
    gen = torch.Generator().manual_seed(1234)
    weights = {}
    for name, shape in cfg.weight_shapes().items():
        if ".ln" in name or "post_ln" in name:  # layer norms: identity
            t = torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        weights["model." + name] = t.contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(weights, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f)
    # the conformance models' tokenizer: its ids fit the 512-token vocabulary and the templates
    shutil.copy(os.path.join(ROOT, "tests/conformance/main/tokenizer.json"), os.path.join(directory, "tokenizer.json"))


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def bodies(workload: str, n: int, max_tokens: int, data_urls: dict) -> list[dict]:
    out = []
    for i in range(n):
        body = {"question": f"What is in this picture, number {i}?",
                "settings": {"temperature": 0, "max_tokens": max_tokens}}
        if workload == "image":
            body["image_url"] = data_urls[IMAGES[i % len(IMAGES)]]
        out.append(body)
    return out


def post(url: str, body: dict) -> int:
    """One /v1/query; its generated tokens."""
    req = urllib.request.Request(url + "/v1/query", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return int(json.loads(resp.read())["metrics"]["output_tokens"])


def measure(url: str, pid: int, requests: list[dict], concurrency: int) -> dict:
    """GPU worker CPU ms per generated token over `requests`, `concurrency` in flight."""
    cpu0, t0 = process_cpu_s(pid), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(lambda b: post(url, b), requests))
    cpu, wall = process_cpu_s(pid) - cpu0, time.perf_counter() - t0
    return {"cpu_ms_per_token": cpu * 1e3 / max(tokens, 1), "tokens": tokens, "cpu_s": cpu, "wall_s": wall}


def worker(args) -> None:
    """In a subprocess with one code tree first on sys.path: start its stack, measure, print one JSON line."""
    sys.path.insert(0, args.code)
    from tests.http_helpers import fixture_data_url
    from tests.stack import running_stack

    model_dir = tempfile.mkdtemp(prefix="md-overhead-model-")
    try:
        write_checkpoint(model_dir)
        data_urls = {name: fixture_data_url("main", name) for name in IMAGES}
        # HTTP_THREADS above the 32 in flight (a front-end setting, as bench/serve.py does): a request
        # of the last wave can still hold its in-flight count when the next wave starts, and get a 429
        settings = dict(item.split("=", 1) for item in args.env)
        with running_stack(ready_timeout=300, MOONDREAM_MODEL=model_dir, TORCH_THREADS=1,
                           HTTP_THREADS=CONCURRENT + 8, **settings) as stack:
            pid = stack.pid("gpu_worker")
            for workload in args.workloads:  # warm-up: every image encoded (and cached), code paths run
                warm = bodies(workload, len(IMAGES), 4, data_urls)  # (COMPILE=on: the graphs compiled)
                measure(stack.url, pid, warm, 1)
                measure(stack.url, pid, warm * (CONCURRENT // len(warm)), CONCURRENT)
            result = {}
            for workload in args.workloads:
                result[workload] = {
                    "1": measure(stack.url, pid, bodies(workload, args.sequential, args.max_tokens, data_urls), 1),
                    str(CONCURRENT): measure(stack.url, pid, bodies(workload, CONCURRENT * args.waves,
                                                                    args.max_tokens, data_urls), CONCURRENT),
                }
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    print("RESULT " + json.dumps(result))


def run_tree(code: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--code", code, "--sequential", str(args.sequential),
           "--waves", str(args.waves), "--max-tokens", str(args.max_tokens), "--workloads", *args.workloads] + \
        [f"--env={item}" for item in args.env]
    env = {**os.environ, "PYTHONPATH": code}
    from bench.common import run_child  # here, not at the top: a child runs with the other tree's bench first

    return run_child(cmd, env, code)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help="commit to compare against, or 'none'")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two trees")
    ap.add_argument("--sequential", type=int, default=8, help="requests sent one at a time")
    ap.add_argument("--waves", type=int, default=2, help=f"waves of {CONCURRENT} requests sent at once")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--workloads", nargs="+", default=["image", "text"], choices=["image", "text"])
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="a stack setting for both trees (e.g. COMPILE=on); repeatable")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.quick:
        args.sequential, args.waves, args.max_tokens, args.rounds, args.workloads = 2, 1, 8, 1, ["image"]

    sys.path.insert(0, ROOT)  # this tree's bench package, for the parent only (a child runs the baseline's tree first)
    from bench.common import baseline_tree

    with baseline_tree(args.baseline, with_venv=True) as baseline:
        trees = {"this": ROOT, **({"baseline": baseline} if baseline else {})}
        runs = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, code in trees.items():
                runs[name].append(run_tree(code, args))

    print(f"24-layer tiny-width checkpoint over HTTP, TORCH_THREADS=1, HTTP_THREADS=40, defaults otherwise; max_tokens "
          f"{args.max_tokens}; {args.rounds} rounds; {' '.join(args.env) or 'no other setting'}; GPU worker CPU ms per generated token (median of rounds)")
    print("| workload | in flight | tree | CPU ms/token | rounds | tokens/round | bar | ratio to baseline |")
    print("|---|---|---|---|---|---|---|---|")
    out = {}
    for workload in args.workloads:
        for flight in ("1", str(CONCURRENT)):
            per = {name: [r[workload][flight]["cpu_ms_per_token"] for r in rs] for name, rs in runs.items()}
            base = statistics.median(per["baseline"]) if "baseline" in per else None
            for name in trees:
                ms = statistics.median(per[name])
                tokens = runs[name][0][workload][flight]["tokens"]
                ratio = f"{ms / base:.2f}" if base else "-"
                rounds = " / ".join(f"{x:.2f}" for x in per[name])
                print(f"| {workload} | {flight} | {name} | {ms:.2f} | {rounds} | {tokens} | "
                      f"<= {BARS_MS[int(flight)]} | {ratio} |")
                out.setdefault(workload, {}).setdefault(flight, {})[name] = {"cpu_ms_per_token": ms, "rounds": per[name],
                                                                             "tokens": tokens}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
