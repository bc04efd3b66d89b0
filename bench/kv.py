"""KV memory: the paged block pool against the slot design it replaced, in one run.

    python bench/kv.py                                # full-size random weights, float32, CPU
    python bench/kv.py --model random:tiny --quick    # seconds; for the smoke test

The slot design (a full-context KV slot per sequence, the image prefix copied into
each) is measured from its own code: the script checks out `--baseline` (the last
commit before the pool) in a temporary git worktree and imports that tree's engine
beside this one, in the same process, on the same weights.  Three comparisons, each a
ratio of the two:

1. sequences that fit in an 8 GiB KV budget, requests of ~800 positions (the image
   prefix, a short prompt, ~56 generated tokens), each on its own image (the worst
   case for the pool: nothing shared) and all on one image;
2. KV bytes held while 32 questions on one image run: the pool's peak use in a real
   scheduler run against what the slot design allocates for 32 sequences plus the
   image cache's copy of the prefix;
3. decode step time (forward + lm_head) at batch 8 and 32 with ~790 positions per
   sequence, each on its own image: the pool's attention over block tables against
   the slot design's dense path (rows read in place), every cache filled with random
   values first (untouched memory would read as free zero pages).  The two alternate in
   rounds, one design's cache at a time, and each step is timed in wall and in this
   process's CPU seconds: on a shared machine the CPU time is what the step cost.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

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
    cache (the slot design's is the larger) would not fit in the memory free now."""
    from bench.engine import mem_available_bytes

    cfg = engine.config
    need = b * (context + 8) * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.finfo(engine.kv_dtype).bits // 8
    if need * 1.2 < mem_available_bytes():
        return True
    print(f"decode batch {b}: skipped, {need / 2**30:.1f} GiB of KV does not fit in free memory", file=sys.stderr)
    return False


def step_seconds(engine, b, position, forward, reps, warmup) -> list:
    """[(wall seconds, CPU seconds)] per decode step (forward + lm_head)."""
    ids = torch.randint(1, engine.config.vocab_size, (b,)).tolist()

    def step():
        engine.logits(forward(engine.embed_tokens(ids).view(b, 1, -1), [position] * b))

    for _ in range(warmup):
        step()
    out = []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        out.append((time.perf_counter() - wall, time.process_time() - cpu))
    return out


# ------------------------------------------------------------------ the slot design (the baseline's own code)
def baseline_modules(tree: str):
    """The baseline tree's gpu_worker.model and gpu_worker.engine, imported beside this
    tree's (the modules keep their own globals, so each engine runs its own code)."""
    ours = {k: m for k, m in sys.modules.items() if k == "gpu_worker" or k.startswith("gpu_worker.")}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, tree)
    try:
        import gpu_worker.engine as old_engine
        import gpu_worker.model as old_model
    finally:
        sys.path.remove(tree)
        for k in [k for k in sys.modules if k == "gpu_worker" or k.startswith("gpu_worker.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    return old_model, old_engine


def slots_part(old_model, engine) -> dict:
    cfg, dtype = engine.config, engine.kv_dtype
    per_slot = old_model.KVCache(cfg, 1, cfg.max_context, "meta", dtype).bytes()
    per_position = per_slot // (cfg.max_context + 1)
    return {"per_slot_bytes": per_slot,
            "fit_in_budget": BUDGET // per_slot,  # as slots_that_fit counts them: the same for any image mix
            "questions_bytes": old_model.KVCache(cfg, QUESTIONS, cfg.max_context, "meta", dtype).bytes()
            + cfg.prefix_attn * per_position}  # 32 slots, and the image cache's copy of the prefix


def slots_decode(old_engine, b, context):
    """A step on the slot design's dense path, and what to free afterwards."""
    cache = old_engine.new_cache(b, context=context + 8)
    fill_random(cache.k + cache.v)
    slots = list(range(b))
    return (lambda embeds, pos: old_engine.forward(embeds, pos, slots, cache)), cache


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
    from shared.protocol import QueryParams, SamplingSettings

    sched = Scheduler(engine, max_batch=QUESTIONS, kv_cache_bytes=BUDGET, block_size=block_size)
    image = synthetic_image(1)
    for i in range(QUESTIONS):
        sched.add(EngineRequest(f"q{i}", "query", QueryParams(question=f"What is item {i} in the image?"),
                                SamplingSettings(temperature=0, max_tokens=8), image))
    peak, peak_running = 0, 0
    while sched.has_work():
        sched.step()
        peak = max(peak, sched.cache.used_bytes())
        peak_running = max(peak_running, len(sched.running))
    return {"peak_bytes": peak, "peak_running": peak_running}


def pool_decode(engine, b, context, block_size):
    """A step on the block pool, each row on its own image, and what to free afterwards."""
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
        seq = pool.open_sequence(pool.store_prefix(dense), context + 8)
        pool.grow(seq, context)
        seqs.append(seq)
    return (lambda embeds, pos: engine.forward(embeds, pos, seqs, pool)), (pool, seqs)


def decode_ab(engine, old_engine, args) -> dict:
    """Decode steps of both designs, alternating in rounds, one design's cache at a time
    (at batch 32 either takes ~10 GB)."""
    out = {}
    for b in args.batches:
        if not fits_in_memory(engine, b, args.context):
            continue
        times = {"slots": [], "pool": []}
        for _ in range(args.rounds):
            for design in ("slots", "pool"):
                make = slots_decode if design == "slots" else pool_decode
                forward, held = make(old_engine, b, args.context) if design == "slots" else \
                    make(engine, b, args.context, args.block_size)
                times[design] += step_seconds(engine, b, args.context - 1, forward, args.reps, args.warmup)
                del forward, held
                gc.collect()
            print(f"decode batch {b}: a round done", file=sys.stderr, flush=True)
        out[b] = times
    return out


# ------------------------------------------------------------------ driver
def run(args) -> tuple[dict, dict]:
    tree = tempfile.mkdtemp(prefix="bench-kv-baseline-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "--force", tree, args.baseline],
                   check=True, capture_output=True)
    try:
        old_model, old_engine_module = baseline_modules(tree)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
    from gpu_worker.checkpoint import Checkpoint

    engine = load(args)
    old_engine = old_engine_module.Engine(Checkpoint(engine.config, engine.weights, engine.tokenizer, "baseline", True))
    slots = slots_part(old_model, engine)
    pool = {"fit_in_budget": fit_in_budget(engine, args.block_size, one_image=False),
            "fit_in_budget_one_image": fit_in_budget(engine, args.block_size, one_image=True)}
    pool["questions"] = questions_on_one_image(engine, args.block_size)
    print("capacity and the 32 questions: done", file=sys.stderr, flush=True)
    decode = decode_ab(engine, old_engine, args)
    slots["decode"] = {b: t["slots"] for b, t in decode.items()}
    pool["decode"] = {b: t["pool"] for b, t in decode.items()}
    return slots, pool


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
        for i, clock in ((1, "CPU"), (0, "wall")):
            s = median([t[i] for t in slots["decode"][b]])
            p = median([t[i] for t in pool["decode"][b]])
            rows.append((f"decode step {clock} ms, batch {b}, {args.context} positions each", round(s * 1e3, 1),
                         round(p * 1e3, 1), p / s, "<= 1.10" if clock == "CPU" else ""))
    print(f"| measure | slot design ({args.baseline}) | block pool (block size {args.block_size}) | pool / slots | wanted |")
    print("|---|---|---|---|---|")
    for what, a, b, ratio, wanted in rows:
        print(f"| {what} | {a} | {b} | {ratio:.3f} | {wanted} |")
    print(f"\n{QUESTIONS} questions: at most {pool['questions']['peak_running']} ran at once")
    return {"rows": rows, "slots": slots, "pool": pool}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--baseline", default=BASELINE, help="a commit with the slot design")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--context", type=int, default=790, help="positions per sequence in the decode steps")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="timed decode steps per round and design")
    p.add_argument("--rounds", type=int, default=2, help="rounds of slot-design-then-pool decode steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 repetitions, one round, no warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 for an A/B on a "
                   "shared machine, where waiting threads make many small kernels many times slower")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.reps, args.warmup, args.rounds = 2, 0, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    slots, pool = run(args)
    result = report(args, slots, pool)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
