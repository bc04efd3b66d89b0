"""Moondream 3 on the CPU with int8 weights, against Moondream 2 int8 in the same run.

    python bench/md3.py                    # full-size random weights (the real geometries), 1 thread
    python bench/md3.py --quick --md3 random:md3-tiny --md2 random:tiny   # seconds; the smoke test

Each model is loaded in its own process (MOONDREAM_DTYPE=int8, one torch thread), so its
resident memory is its own: weights after loading, then the KV cache the batch needs.
A decode step is one engine forward of B rows at ~`--context` positions of context plus
lm_head, timed as the process's CPU time (on a shared machine that is what the step cost).

1. Batch 1 and batch 8: both processes loaded, timed in turns (the first of each pair
   alternates), so other jobs' load falls on both models alike.  The figure of merit is
   Moondream 3's batch-1 step over Moondream 2's (target: within 1.5x).
2. Batch 32: Moondream 2's process is closed first (memory), then Moondream 3 alone.

Moondream 3's rows at batch B route to up to min(64, 8 B) experts per MoE layer: at batch
1 a step reads 8 of 64 experts (about 2.2 B parameters in all), at batch 32 nearly all.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import markdown_table, median, save_json  # noqa: E402
from gpu_worker.engine import load_model  # noqa: E402
from shared.config import Config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "RESULT "  # marks the child's answers on its stdout


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def serve(model: str, context: int, threads: int) -> None:
    """Child process: load one model in int8, report its memory, then time the decode steps
    the parent names on stdin ("decode <batch>"), one CPU time per line."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    engine = load_model(Config(model=model, device="cpu", dtype="int8"))
    info = {"model": model, "family": engine.config.family, "load_s": round(time.perf_counter() - started, 1),
            "rss_weights_bytes": rss_bytes(), "threads": torch.get_num_threads()}
    print(RESULT + json.dumps(info), flush=True)
    caches = {}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for line in sys.stdin:
            batch = int(line.split()[1])
            if batch not in caches:
                caches.clear()  # one cache at a time: batch 32 of Moondream 3 is ~5 GB of keys and values
                caches[batch] = engine.new_cache(batch, context=context + 8)
            cache = caches[batch]
            tokens = torch.randint(10, engine.config.vocab_size, (batch,), generator=gen).tolist()
            start = time.process_time()
            hidden = engine.forward(engine.embed_tokens(tokens).view(batch, 1, -1), [context - 1] * batch,
                                    list(range(batch)), cache)
            engine.logits(hidden)
            elapsed = time.process_time() - start
            print(RESULT + json.dumps({"cpu_s": elapsed, "rss_bytes": rss_bytes()}), flush=True)


class Child:
    """One model's `serve` process."""

    def __init__(self, args, model: str):
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", model, "--context", str(args.context),
               "--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.info = self._answer()
        self.times: dict[int, list[float]] = {}
        self.rss: dict[int, int] = {}

    def _answer(self):
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        raise RuntimeError(f"the benchmark's child process exited ({self.proc.wait()})")

    def decode(self, batch: int, record: bool = True) -> None:
        self.proc.stdin.write(f"decode {batch}\n")
        self.proc.stdin.flush()
        answer = self._answer()
        if record:
            self.times.setdefault(batch, []).append(answer["cpu_s"])
            self.rss[batch] = max(self.rss.get(batch, 0), answer["rss_bytes"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def measure(args) -> dict:
    children = {}
    try:
        children["md3"] = Child(args, args.md3)  # the bigger one first, while memory is freest
        children["md2"] = Child(args, args.md2)
        pair = [children["md2"], children["md3"]]
        for batch, reps in ((1, args.reps), (8, args.reps_8)):
            for child in pair:
                child.decode(batch, record=False)  # warm-up (and the cache's allocation)
            for i in range(reps):
                for child in (pair if i % 2 == 0 else pair[::-1]):
                    child.decode(batch)
        children.pop("md2").close()
        md3 = children["md3"]
        md3.decode(32, record=False)
        for _ in range(args.reps_32):
            md3.decode(32)
        return {name: {**c.info, "decode_cpu_s": {str(b): t for b, t in c.times.items()},
                       "rss_bytes": {str(b): r for b, r in c.rss.items()}}
                for name, c in (("md2", pair[0]), ("md3", md3))}
    finally:
        for child in children.values():
            child.close()


def report(results: dict, args) -> dict:
    md2, md3 = results["md2"], results["md3"]
    ms = {name: {b: median(t) * 1000 for b, t in r["decode_cpu_s"].items()} for name, r in results.items()}
    ratio = ms["md3"]["1"] / ms["md2"]["1"]
    rows = []
    for batch in ("1", "8", "32"):
        row = [batch]
        for name in ("md2", "md3"):
            if batch in ms[name]:
                row += [f"{ms[name][batch]:.0f}", f"{int(batch) * 1000 / ms[name][batch]:.1f}",
                        f"{results[name]['rss_bytes'][batch] / 2**30:.2f}"]
            else:
                row += ["-", "-", "-"]
        rows.append(row)
    print(f"int8 on the CPU, {md3['threads']} thread(s), context ~{args.context} positions per row; "
          f"CPU time per decode step, median of {args.reps} / {args.reps_8} / {args.reps_32} steps")
    print(markdown_table(["batch", "MD2 ms/step", "MD2 tok/s", "MD2 RSS GiB", "MD3 ms/step", "MD3 tok/s",
                          "MD3 RSS GiB"], rows))
    print(f"resident after loading: Moondream 2 {md2['rss_weights_bytes'] / 2**30:.2f} GiB "
          f"(load {md2['load_s']} s), Moondream 3 {md3['rss_weights_bytes'] / 2**30:.2f} GiB (load {md3['load_s']} s)")
    print(f"Moondream 3 / Moondream 2 batch-1 decode step: {ratio:.2f}x (target <= 1.5x)")
    return {"args": vars(args), "results": results, "median_ms": ms, "md3_over_md2_batch1": ratio}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--md3", default="random:md3-full")
    parser.add_argument("--md2", default="random:full")
    parser.add_argument("--context", type=int, default=780, help="positions of context per row (image + prompt)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=12, help="batch-1 steps per model")
    parser.add_argument("--reps-8", type=int, default=6)
    parser.add_argument("--reps-32", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    parser.add_argument("--json", default="")
    parser.add_argument("--serve", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.context, args.threads)
        return {}
    if args.quick:
        args.reps, args.reps_8, args.reps_32 = 2, 1, 1
    out = report(measure(args), args)
    save_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
