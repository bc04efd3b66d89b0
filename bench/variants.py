"""What serving fine-tuned variants costs: a decode step whose rows use several LoRA
adapters against the same step with none, measured alternately in one run.

    python bench/variants.py                       # full-size random weights, CPU, float32, batch 32, 4 rank-8 adapters
    python bench/variants.py --device cuda --dtype bfloat16
    python bench/variants.py --model random:tiny --quick    # seconds; for the smoke test

Rows take the adapters round-robin (row i uses adapter i mod N), so every step
really mixes N variants in one batched forward (model.LoraBatch).  The KV cache
holds only the positions the step touches (`--context`): the weights, not the
attention, dominate a decode step, and a shorter context makes the adapters'
share look larger, not smaller.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (code_version, describe_device, kv_sequences, load_engine, markdown_table, median, save_json,  # noqa: E402
                          sync)
from gpu_worker.variants import ADAPTED, adapter_from_state_dict  # noqa: E402


def random_adapter(engine, name: str, rank: int, seed: int):
    """An adapter with the model's shapes (through the same checks as a file)."""
    cfg = engine.config
    gen = torch.Generator().manual_seed(seed)
    dims = {"attn.qkv": (cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim), "attn.proj": (cfg.dim, cfg.dim),
            "mlp.fc1": (cfg.dim, cfg.ff_dim), "mlp.fc2": (cfg.ff_dim, cfg.dim)}
    state = {}
    for i in range(cfg.n_layers):
        for linear in ADAPTED:
            n_in, n_out = dims[linear]
            state[f"text.blocks.{i}.{linear}.A"] = torch.randn(rank, n_in, generator=gen) / n_in ** 0.5
            state[f"text.blocks.{i}.{linear}.B"] = torch.randn(n_out, rank, generator=gen) * 0.01
    return adapter_from_state_dict(name, state, cfg, engine.device, engine.dtype)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--context", type=int, default=256, help="positions per sequence in the KV cache")
    p.add_argument("--reps", type=int, default=4, help="timed steps of each kind (alternating)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="batch 4, 2 reps (smoke test)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.reps = min(args.batch, 4), 2

    engine = load_engine(args.model, args.device, args.dtype)
    adapters = [random_adapter(engine, f"bench-{i}@1", args.rank, seed=100 + i) for i in range(args.adapters)]
    b, cfg = args.batch, engine.config
    per_row = [adapters[i % len(adapters)] for i in range(b)]
    ids = torch.randint(1, cfg.vocab_size, (b,), generator=torch.Generator().manual_seed(0)).tolist()
    cache, seqs = kv_sequences(engine, b, args.context)
    position = args.context - 1

    def step(with_adapters: bool) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds): on a shared CPU the second is
        what the step itself cost, whatever else the machine runs."""
        sync(engine.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        hidden = engine.forward(engine.embed_tokens(ids).view(b, 1, -1), [position] * b, seqs, cache,
                                adapters=per_row if with_adapters else None)
        engine.logits(hidden)
        sync(engine.device)
        return time.perf_counter() - start, time.process_time() - cpu_start

    print(f"{describe_device(engine.device)}, {engine.info['dtype']}, {args.model}, batch {b}, "
          f"{args.adapters} adapters of rank {args.rank}, code {code_version()}", file=sys.stderr, flush=True)
    step(False), step(True)  # warm-up: first calls allocate
    base, lora = [], []
    for _ in range(args.reps):  # alternate, so drift in the machine's speed hits both alike
        base.append(step(False))
        lora.append(step(True))
        print(f"  no adapter {base[-1][0] * 1e3:.1f} ms ({base[-1][1] * 1e3:.1f} CPU ms), {args.adapters} adapters "
              f"{lora[-1][0] * 1e3:.1f} ms ({lora[-1][1] * 1e3:.1f} CPU ms)", file=sys.stderr, flush=True)
    wall = [median([s[0] for s in runs]) for runs in (base, lora)]
    cpu = [median([s[1] for s in runs]) for runs in (base, lora)]
    ratio, cpu_ratio = wall[1] / wall[0], cpu[1] / cpu[0]
    rows = [["no adapter", f"{wall[0] * 1e3:.1f}", "1.00", f"{cpu[0] * 1e3:.1f}", "1.00"],
            [f"{args.adapters} adapters, rank {args.rank}, round-robin", f"{wall[1] * 1e3:.1f}", f"{ratio:.3f}",
             f"{cpu[1] * 1e3:.1f}", f"{cpu_ratio:.3f}"]]
    print(markdown_table([f"decode step, batch {b}", "median ms", "ratio", "median CPU ms", "CPU ratio"], rows))
    result = {"model": args.model, "device": describe_device(engine.device), "dtype": engine.info["dtype"],
              "batch": b, "adapters": args.adapters, "rank": args.rank, "context": args.context,
              "threads": torch.get_num_threads(), "base_s": [s[0] for s in base], "adapters_s": [s[0] for s in lora],
              "base_cpu_s": [s[1] for s in base], "adapters_cpu_s": [s[1] for s in lora],
              "ratio": ratio, "cpu_ratio": cpu_ratio, "code": code_version()}
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
