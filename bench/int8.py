"""int8 weights (MOONDREAM_DTYPE=int8) against float32 on the CPU: speed, memory, fidelity.

    python bench/int8.py                          # full-size random weights (the real geometry)
    python bench/int8.py --model random:tiny --quick   # seconds; for the smoke test

1. Speed and memory, each dtype in its own process (so resident memory is that dtype's
   alone): resident set size after loading, a batch-1 decode step (~780 positions of
   context) and a 2-crop image encode (vision encoder + the 730-position prefix prefill).
   Times are the process's CPU time: on a shared machine that is what the step cost.
   Both processes stay loaded (int8 first, then float32: ~10.5 GB together on the full
   model) and take turns, one step each, so other jobs' load (which slows memory-bound
   steps even in CPU time) falls on both dtypes alike.
2. Fidelity, in this process: the same greedy requests through both engines, comparing the
   first logits (relative error: max |int8 - float32| / max |float32|) and the answers'
   tokens (positions equal, and the length of the identical prefix), on the model above and
   on the conformance set `main` (its text cases, 24 tokens each).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import describe_device, kv_sequences, markdown_table, median, save_json  # noqa: E402
from bench.engine import synthetic_image  # noqa: E402
from gpu_worker.engine import load_model  # noqa: E402
from gpu_worker.engine_types import EngineRequest  # noqa: E402
from gpu_worker.scheduler import Recorder  # noqa: E402
from shared.config import Config  # noqa: E402
from shared.protocol import CaptionParams, QueryParams, SamplingSettings  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFORMANCE_MAIN = os.path.join(REPO, "tests", "conformance", "main")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


RESULT = "RESULT "  # marks the child's answers on its stdout


def serve(model: str, dtype: str, context: int) -> None:
    """Child process: load one dtype, report its memory, then time the steps the parent
    names on stdin ("decode" / "encode"), one CPU time per line."""
    engine = load_model(Config(model=model, device="cpu", dtype=dtype))
    rss = rss_bytes()
    cache, seqs = kv_sequences(engine, 1, context + 8)
    image = synthetic_image(2)

    def decode():
        hidden = engine.forward(engine.embed_tokens([5]).view(1, 1, -1), [context - 1], seqs, cache)
        engine.logits(hidden)

    steps = {"decode": decode, "encode": lambda: engine.encode_images([image])}
    print(RESULT + json.dumps({"dtype": dtype, "rss_bytes": rss, "layers": engine.config.n_layers,
                               "threads": torch.get_num_threads()}), flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            start = time.process_time()
            steps[line.strip()]()
            print(RESULT + json.dumps(time.process_time() - start), flush=True)


class Child:
    """One dtype's `serve` process."""

    def __init__(self, args, dtype: str):
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", dtype, "--model", args.model,
               "--context", str(args.context), "--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.info = self._answer()

    def _answer(self):
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        raise RuntimeError(f"the benchmark's child process exited ({self.proc.wait()})")

    def time(self, step: str) -> float:
        self.proc.stdin.write(step + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def measure_speed(args) -> dict:
    """Both dtypes loaded side by side, timed in turns (the first of each pair alternates)."""
    children = {}
    try:
        for dtype in ("int8", "float32"):  # int8 first: its float32 load is freed before float32's starts
            children[dtype] = Child(args, dtype)
        pair = [children["float32"], children["int8"]]
        for child in pair:  # warm-up
            child.time("decode")
            child.time("encode")
        times = {dtype: {"decode_b1_cpu_s": [], "encode_2crop_cpu_s": []} for dtype in children}
        plan = (("decode", "decode_b1_cpu_s", args.reps), ("encode", "encode_2crop_cpu_s", args.encode_reps))
        for step, key, reps in plan:
            for i in range(reps):
                for child in (pair if i % 2 == 0 else pair[::-1]):
                    times[child.info["dtype"]][key].append(child.time(step))
    finally:
        for child in children.values():
            child.close()
    return {dtype: {**children[dtype].info, **times[dtype]} for dtype in ("float32", "int8")}


def greedy_runs(engine, requests: list[EngineRequest]) -> dict:
    """request id -> (first logits row, generated tokens) for greedy requests, one at a time."""
    sched = engine.create_scheduler(max_batch=1)
    out = {}
    for req in requests:
        sched.recorder = Recorder([req.request_id])
        sched.add(EngineRequest(req.request_id, req.skill, req.params, req.settings, req.image))
        while sched.has_work():
            sched.step()
        rec = sched.recorder.records[req.request_id]
        tokens = [t for feed in rec["feeds"][1:] if feed is not None for t in feed]
        out[req.request_id] = (rec["logits"][0], tokens)
    return out


def fidelity(model: str, requests: list[EngineRequest]) -> dict:
    runs = {}
    for dtype in ("float32", "int8"):
        engine = load_model(Config(model=model, device="cpu", dtype=dtype))
        runs[dtype] = greedy_runs(engine, requests)
        del engine
    errors, equal, prefixes, total = [], 0, [], 0
    for req in requests:
        (l32, t32), (l8, t8) = runs["float32"][req.request_id], runs["int8"][req.request_id]
        errors.append(float((l8 - l32).abs().max() / l32.abs().max()))
        n = max(len(t32), len(t8))
        equal += sum(a == b for a, b in zip(t32, t8))
        total += n
        prefix = next((i for i, (a, b) in enumerate(zip(t32, t8)) if a != b), min(len(t32), len(t8)))
        prefixes.append(prefix)
    return {"requests": len(requests), "logit_rel_err_median": median(errors), "logit_rel_err_max": max(errors),
            "token_agreement": equal / max(1, total), "identical_prefix_median": median(prefixes),
            "tokens_per_answer": total / max(1, len(requests))}


def model_requests(max_tokens: int) -> list[EngineRequest]:
    image = synthetic_image(2, seed=7)
    greedy = SamplingSettings(temperature=0, max_tokens=max_tokens)
    return [EngineRequest(uuid.uuid4().hex, "caption", CaptionParams(length="normal"), greedy, image),
            EngineRequest(uuid.uuid4().hex, "query", QueryParams(question="What is in the image?"), greedy, image),
            EngineRequest(uuid.uuid4().hex, "query", QueryParams(question="Describe a cat."), greedy, None)]


def conformance_requests() -> list[EngineRequest]:
    from tests.engine_helpers import fixture_image, request_from_case

    with open(os.path.join(CONFORMANCE_MAIN, "expected.json")) as f:
        cases = [c for c in json.load(f)["cases"] if c["skill"] in ("caption", "query")]
    return [request_from_case(c, fixture_image("main", c["image"]) if c["image"] else None) for c in cases]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:full")
    p.add_argument("--reps", type=int, default=9, help="timed batch-1 decode steps per dtype")
    p.add_argument("--encode-reps", type=int, default=1, help="timed 2-crop encodes")
    p.add_argument("--context", type=int, default=780, help="positions before the decoded one")
    p.add_argument("--max-tokens", type=int, default=64, help="answer length for the fidelity runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="few reps, short answers (smoke test)")
    p.add_argument("--serve", help=argparse.SUPPRESS)  # child process: one dtype
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.serve:
        serve(args.model, args.serve, args.context)
        return {}
    if args.quick:
        args.reps, args.encode_reps, args.max_tokens = 2, 1, 8

    speed = measure_speed(args)
    f32, i8 = speed["float32"], speed["int8"]
    decode_x = median(f32["decode_b1_cpu_s"]) / median(i8["decode_b1_cpu_s"])
    encode_x = median(f32["encode_2crop_cpu_s"]) / median(i8["encode_2crop_cpu_s"])
    memory = i8["rss_bytes"] / f32["rss_bytes"]
    rows = [["batch-1 decode step (CPU ms)", f"{median(f32['decode_b1_cpu_s']) * 1e3:.1f}",
             f"{median(i8['decode_b1_cpu_s']) * 1e3:.1f}", f"{decode_x:.2f}x faster"],
            ["2-crop image encode (CPU ms)", f"{median(f32['encode_2crop_cpu_s']) * 1e3:.1f}",
             f"{median(i8['encode_2crop_cpu_s']) * 1e3:.1f}", f"{encode_x:.2f}x faster"],
            ["resident memory after load (GiB)", f"{f32['rss_bytes'] / 2**30:.2f}", f"{i8['rss_bytes'] / 2**30:.2f}",
             f"{memory:.0%} of float32"]]
    print(f"{describe_device(torch.device('cpu'))}, {args.model}, {args.threads} thread(s)", file=sys.stderr)
    print(markdown_table(["", "float32", "int8", "int8 vs float32"], rows))

    fid = {args.model: fidelity(args.model, model_requests(args.max_tokens)),
           "conformance main": fidelity(CONFORMANCE_MAIN, conformance_requests())}
    frows = [[name, f["requests"], f"{f['tokens_per_answer']:.0f}", f"{f['logit_rel_err_median']:.4f}",
              f"{f['logit_rel_err_max']:.4f}", f"{f['token_agreement']:.1%}", f"{f['identical_prefix_median']:.0f}"]
             for name, f in fid.items()]
    print()
    print(markdown_table(["model", "greedy requests", "tokens each", "first-logits rel. error (median)",
                          "(max)", "tokens equal", "identical prefix (median)"], frows))
    result = {"speed": speed, "decode_speedup": decode_x, "encode_speedup": encode_x, "memory_ratio": memory,
              "fidelity": fid}
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
