"""KV memory: the paged block pool against the slot design it replaced, in one run.

    python bench/kv.py                                # full-size random weights, float32, CPU
    python bench/kv.py --model random:tiny --quick    # seconds; for the smoke test

The slot design (a full-context KV slot per sequence, the image prefix copied into
each) is measured from its own code: the script checks out `--baseline` (the last
commit before the pool) in a temporary git worktree and runs its part there, in a
subprocess, then its own part here.  Three comparisons, each a ratio of the two:

1. sequences that fit in an 8 GiB KV budget, requests of ~800 positions (the image
   prefix, a short prompt, ~56 generated tokens), each on its own image (the worst
   case for the pool: nothing shared) and all on one image;
2. KV bytes held while 32 questions on one image run: the pool's peak use in a real
   scheduler run against what the slot design allocates for 32 sequences plus the
   image cache's copy of the prefix;
3. decode step time (forward + lm_head) at batch 8 and 32 with ~790 positions per
   sequence, each on its own image: the pool's attention over block tables against
   the slot design's dense path (rows read in place), every cache filled with random
   values first (untouched memory would read as free zero pages).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "1bd778a"  # the last commit with the slot design (KV slots, prefixes copied per slot)
BUDGET = 8 * 2**30
REQUEST_POSITIONS = 800  # 730 prefix + 14 prompt + 56 generated
QUESTIONS = 32


def synthetic_image(seed: int):
    from gpu_worker.engine_types import ImageInput

    crops = np.random.default_rng(seed).integers(0, 256, size=(2, 378, 378, 3), dtype=np.uint8)
    return ImageInput(crops=crops, tiling=(1, 1), key=f"bench-kv-{seed}")


def fill_random(tensors) -> None:
    for t in tensors:
        t.normal_()


def load(args):
    from bench.common import load_engine

    torch.manual_seed(0)
    return load_engine(args.model, args.device, args.dtype)


def fits_in_memory(engine, b: int, context: int) -> bool:
    """A shared host must not be pushed into swapping or the OOM killer: skip a batch whose
    caches (the slot design's are the larger) would not fit in the memory free now."""
    from bench.engine import mem_available_bytes

    cfg = engine.config
    need = b * (context + 8) * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.finfo(engine.kv_dtype).bits // 8
    if need * 1.2 < mem_available_bytes():
        return True
    print(f"decode batch {b}: skipped, {need / 2**30:.1f} GiB of KV does not fit in free memory", file=sys.stderr)
    return False


def step_seconds(engine, b, position, forward, reps, warmup) -> list[float]:
    from bench.common import time_it

    ids = torch.randint(1, engine.config.vocab_size, (b,)).tolist()

    def step():
        engine.logits(forward(engine.embed_tokens(ids).view(b, 1, -1), [position] * b))

    return time_it(step, engine.device, reps=reps, warmup=warmup)


# ------------------------------------------------------------------ the slot design (run in the baseline tree)
def slots_part(args) -> dict:
    from gpu_worker import model as M

    engine = load(args)
    cfg, dtype = engine.config, engine.kv_dtype
    per_slot = M.KVCache(cfg, 1, cfg.max_context, "meta", dtype).bytes()
    per_position = per_slot // (cfg.max_context + 1)
    out = {"per_slot_bytes": per_slot,
           "fit_in_budget": BUDGET // per_slot,  # as slots_that_fit counts them: the same for any image mix
           "questions_bytes": M.KVCache(cfg, QUESTIONS, cfg.max_context, "meta", dtype).bytes() + cfg.prefix_attn * per_position,
           "decode": {}}
    for b in args.batches:
        if not fits_in_memory(engine, b, args.context):
            continue
        cache = engine.new_cache(b, context=args.context + 8)
        fill_random(cache.k + cache.v)
        slots = list(range(b))
        out["decode"][b] = step_seconds(engine, b, args.context - 1,
                                        lambda embeds, pos: engine.forward(embeds, pos, slots, cache), args.reps, args.warmup)
        del cache
        gc.collect()
    return out


# ------------------------------------------------------------------ the block pool (this tree)
def meta_pool(engine, budget, block_size):
    from gpu_worker import model as M

    block_bytes = M.kv_bytes_per_position(engine.config, engine.kv_dtype) * block_size
    return M.PagedKVCache(engine.config, budget // block_bytes, block_size, engine.config.max_context, "meta", engine.kv_dtype)


def meta_prefix(engine):
    from gpu_worker import model as M

    cfg = engine.config
    shape = (cfg.n_kv_heads, cfg.prefix_attn, cfg.head_dim)
    return M.PrefixKV(k=[torch.empty(shape, device="meta") for _ in range(cfg.n_layers)],
                      v=[torch.empty(shape, device="meta") for _ in range(cfg.n_layers)], length=cfg.prefix_attn)


def fit_in_budget(engine, block_size, one_image: bool) -> int:
    """Requests of REQUEST_POSITIONS admitted into a BUDGET pool, as the scheduler admits:
    the image's blocks (once per image) plus the request's own, until they do not fit."""
    pool = meta_pool(engine, BUDGET, block_size)
    prefix_blocks = pool.blocks_for(engine.config.prefix_attn)
    own = pool.blocks_for(REQUEST_POSITIONS - engine.config.prefix_attn)
    shared, count = None, 0
    while True:
        need = own + (0 if (one_image and shared is not None) else prefix_blocks)
        if need > pool.allocator.available():
            return count
        prefix = shared if (one_image and shared is not None) else pool.store_prefix(meta_prefix(engine))
        shared = prefix
        pool.open_sequence(prefix, REQUEST_POSITIONS)
        count += 1


def questions_on_one_image(engine, block_size) -> dict:
    """A real scheduler run: QUESTIONS queries on one image, the pool's peak use."""
    from gpu_worker.engine_types import EngineRequest
    from gpu_worker.scheduler import Scheduler

    sched = Scheduler(engine, max_batch=QUESTIONS, kv_cache_bytes=BUDGET, block_size=block_size)
    image = synthetic_image(1)
    for i in range(QUESTIONS):
        sched.add(EngineRequest(f"q{i}", "query", {"question": f"What is item {i} in the image?"},
                                {"temperature": 0, "max_tokens": 8}, image))
    peak, peak_running = 0, 0
    while sched.has_work():
        sched.step()
        peak = max(peak, sched.cache.used_bytes())
        peak_running = max(peak_running, len(sched.running))
    return {"peak_bytes": peak, "peak_running": peak_running}


def pool_decode(engine, b, context, reps, warmup, block_size) -> list[float]:
    from gpu_worker import model as M

    cfg = engine.config
    per_sequence = -(-cfg.prefix_attn // block_size) + -(-(context + 8 - cfg.prefix_attn) // block_size)
    pool = engine.new_cache(b * per_sequence, block_size)
    fill_random(pool.k + pool.v)
    seqs = []
    for _ in range(b):
        shape = (cfg.n_kv_heads, cfg.prefix_attn, cfg.head_dim)
        dense = M.PrefixKV(k=[torch.randn(shape) for _ in range(cfg.n_layers)],
                           v=[torch.randn(shape) for _ in range(cfg.n_layers)], length=cfg.prefix_attn)
        prefix = pool.store_prefix(dense)
        del dense
        seq = pool.open_sequence(prefix, context + 8)
        pool.grow(seq, context)
        seqs.append(seq)
    seconds = step_seconds(engine, b, context - 1,
                           lambda embeds, pos: engine.forward(embeds, pos, seqs, pool), reps, warmup)
    del pool, seqs
    gc.collect()
    return seconds


def pool_part(args) -> dict:
    engine = load(args)
    out = {"fit_in_budget": fit_in_budget(engine, args.block_size, one_image=False),
           "fit_in_budget_one_image": fit_in_budget(engine, args.block_size, one_image=True),
           "decode": {}}
    for b in args.batches:
        if str(b) not in args.measured:  # the slot design's part skipped it: no ratio to take
            continue
        out["decode"][b] = pool_decode(engine, b, args.context, args.reps, args.warmup, args.block_size)
    out["questions"] = questions_on_one_image(engine, args.block_size)
    return out


# ------------------------------------------------------------------ driver
def run_baseline(args) -> dict:
    tree = tempfile.mkdtemp(prefix="bench-kv-baseline-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "--force", tree, args.baseline],
                   check=True, capture_output=True)
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--part", "slots", "--tree", tree,
               "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--context", str(args.context),
               "--batches", ",".join(map(str, args.batches)), "--reps", str(args.reps), "--warmup", str(args.warmup)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tree)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)


def report(args, slots, pool) -> dict:
    from bench.common import median

    gib = 2**30
    rows = [
        ("sequences of ~800 positions in 8 GiB, each on its own image", slots["fit_in_budget"], pool["fit_in_budget"],
         pool["fit_in_budget"] / slots["fit_in_budget"], ">= 2.4"),
        ("the same, all on one image", slots["fit_in_budget"], pool["fit_in_budget_one_image"],
         pool["fit_in_budget_one_image"] / slots["fit_in_budget"], ""),
        (f"KV GiB held by {QUESTIONS} questions on one image", round(slots["questions_bytes"] / gib, 3),
         round(pool["questions"]["peak_bytes"] / gib, 3), pool["questions"]["peak_bytes"] / slots["questions_bytes"], "<= 0.125"),
    ]
    for b in pool["decode"]:
        s, p = median(slots["decode"][str(b)]), median(pool["decode"][b])
        rows.append((f"decode step ms, batch {b}, {args.context} positions each", round(s * 1e3, 1), round(p * 1e3, 1),
                     p / s, "<= 1.10"))
    print(f"| measure | slot design ({args.baseline}) | block pool (block size {args.block_size}) | pool / slots | wanted |")
    print("|---|---|---|---|---|")
    for what, a, b, ratio, wanted in rows:
        print(f"| {what} | {a} | {b} | {ratio:.3f} | {wanted} |")
    print(f"\n{QUESTIONS} questions: at most {pool['questions']['peak_running']} ran at once")
    return {"rows": rows, "slots": slots, "pool": pool}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--baseline", default=BASELINE, help="a commit with the slot design")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--context", type=int, default=790, help="positions per sequence in the decode steps")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 repetitions, no warm-up")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--part", default="", help=argparse.SUPPRESS)  # "slots": the baseline's part, in --tree
    p.add_argument("--tree", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.reps, args.warmup = 2, 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.part == "slots":
        sys.path.insert(0, args.tree)  # the baseline's gpu_worker and bench.common
        print(json.dumps(slots_part(args)))
        return
    sys.path.insert(0, ROOT)
    slots = run_baseline(args)
    args.measured = set(slots["decode"])
    pool = pool_part(args)
    result = report(args, slots, pool)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
