"""Host overhead of a decode step: what a GPU would wait on, measured on the CPU.

    python bench/overhead.py                      # batches 1, 8, 32, 64, baseline = main's parent tree
    python bench/overhead.py --quick              # seconds; for the smoke test
    python bench/overhead.py --baseline none      # this tree only
    python bench/overhead.py --compile            # this tree also with COMPILE=on (compiles first: minutes)
    python bench/overhead.py --device cuda --baseline none --compile   # bench/gpu.sh: step time on a GPU
    python bench/overhead.py --image --baseline 3667eda   # rows on images (4 fixture images, cached)

`random:overhead` is Moondream 2's text stack (24 layers, the same op graph) at tiny
widths (dim 128), so a step's time is mostly Python, dispatch and per-op overhead: the
part of a step a GPU cannot hide.  Not all of it: its 12.6 MB of float32 weights exceed
a core's L2, and the script prints how long one read of them takes (the memory floor)
and a kernel floor (the step's linears and attentions alone).  For the compiled step it
also prints the host time per step outside the graph call, which is what a GPU running
that graph as a CUDA graph would still wait on.  For each batch
size the script fills an in-process Scheduler with text-only greedy queries, lets
them reach steady-state decode (every row feeding one token) and times whole
`Scheduler.step()` calls (forward, lm_head, sampling, the programs' bookkeeping),
one torch thread.  It also counts the PyTorch ops of one step with the profiler
(leaf aten ops that run a kernel: views and metadata ops left out, as
docs/performance.md 4.1 counts them) and the share of the profiled step spent
outside those ops.

The baseline is the code of `--baseline` (a commit), checked out in a temporary git
worktree; each code tree runs in its own subprocess, alternating in rounds, so both
see the same machine load.  Ratios are this tree's step time over the baseline's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "770fe14"  # main before issue 21 (host-time cuts)
BATCHES = (1, 8, 32, 64)

# Moondream 2's text stack at tiny widths; 2 vision layers (no image is used).
OVERHEAD_TEXT = {"dim": 128, "ff_dim": 256, "n_layers": 24, "vocab_size": 512, "n_heads": 2, "n_kv_heads": 2}

# aten ops that launch no kernel: views, shape and metadata changes, allocation
NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::permute",
    "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::as_strided",
    "aten::empty", "aten::empty_strided", "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::detach_",
    "aten::lift_fresh", "aten::resize_", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::chunk",
    "aten::narrow", "aten::flatten", "aten::unflatten", "aten::view_as", "aten::expand_as", "aten::contiguous",
    "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::result_type", "aten::empty_like",
    "aten::set_", "aten::_nnz", "aten::size", "aten::stride", "aten::numel", "aten::dim",
    # no-ops unless they convert, and then their child (aten::copy_) is the kernel
    "aten::to", "aten::_to_copy", "aten::resolve_conj", "aten::resolve_neg",
}


COMPILED_KERNELS = ("cpp_fused", "triton_")  # inductor's generated kernels, profiled by name


def overhead_engine(device: str = "cpu"):
    """random:overhead from the gpu_worker of whichever tree is first on sys.path."""
    import torch
    from gpu_worker.checkpoint import TINY_CONFIG, Checkpoint, ModelConfig, _byte_level_tokenizer
    from gpu_worker.engine import Engine

    raw = {"revision": "2025-06-21", **TINY_CONFIG, "text": OVERHEAD_TEXT,
           "vision": {**TINY_CONFIG["vision"], "enc_n_layers": 2}}
    cfg = ModelConfig.from_json(raw, "2025-06-21")
    gen = torch.Generator().manual_seed(1234)
    weights = {}
    for name, shape in cfg.weight_shapes().items():
        if ".ln" in name or "post_ln" in name:
            weights[name] = torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
        else:
            weights[name] = torch.randn(shape, generator=gen) * 0.02
    weights = {name: t.to(device) for name, t in weights.items()}
    return Engine(Checkpoint(cfg, weights, _byte_level_tokenizer(cfg.vocab_size), "random:overhead",
                             test_model=True))


def query_fields(question: str, max_tokens: int) -> tuple:
    """(params, settings) as the tree on sys.path takes them: typed structs, or the dicts of a
    tree from before the typed messages (the baseline)."""
    try:
        from shared.protocol import QueryParams, SamplingSettings
    except ImportError:
        return {"question": question}, {"temperature": 0, "max_tokens": max_tokens}
    return QueryParams(question=question), SamplingSettings(temperature=0, max_tokens=max_tokens)


IMAGES = ("square_378.png", "photo_773x767.jpg", "landscape_800x600.png", "gray_500x400.png")
WITH_IMAGES = False  # --image: every query on one of IMAGES (row i on image i % 4)


def fixture_images() -> list:
    """IMAGES as the scheduler takes them (preprocessed by the tree's own preprocess worker)."""
    from gpu_worker.engine_types import ImageInput
    from preprocess_worker.worker import preprocess

    out = []
    for name in IMAGES:
        with open(os.path.join(ROOT, "tests/conformance/main/images", name), "rb") as f:
            done = preprocess(f.read(), 10 ** 8, 10 ** 5)
        out.append(ImageInput(crops=done.crops, tiling=done.tiling, key=done.key))
    return out


def steady_scheduler(engine, b: int, max_tokens: int):
    """A Scheduler with b greedy queries (text-only, or on images with --image), stepped until every row decodes."""
    from gpu_worker.engine_types import EngineRequest
    from gpu_worker.scheduler import Scheduler

    from gpu_worker.model import kv_bytes_per_position

    # a pool of b full contexts (an image prefix each: the images are few), whatever memory
    # other processes hold at the moment
    context = 1024 if WITH_IMAGES else 512
    pool = b * context * kv_bytes_per_position(engine.config, engine.kv_dtype)
    sched = Scheduler(engine, max_batch=max(b, 1), context=context, kv_cache_bytes=pool)
    # not streamed (HTTP's default), where the tree knows the difference
    unstreamed = {"stream": False} if "stream" in EngineRequest.__dataclass_fields__ else {}
    images = fixture_images() if WITH_IMAGES else None
    for i in range(b):
        params, settings = query_fields(f"Say something about number {i}.", max_tokens)
        image = {"image": images[i % len(images)]} if images else {}
        sched.add(EngineRequest(f"q{i}", "query", params, settings, **image, **unstreamed))
    for _ in range(50):
        sched.step()
        if len(sched.running) == b and all(s.feed is not None and s.feed.length == 1 for s in sched.running.values()):
            return sched
    raise RuntimeError(f"batch {b} never reached steady decode")


def decoding(sched, b: int) -> bool:
    return len(sched.running) == b and all(s.feed.length == 1 for s in sched.running.values())


def time_steps(engine, b: int, steps: int, graph_timer=None) -> list[float]:
    """Seconds per steady-state Scheduler.step() at batch b (steps where a row finished are dropped).
    With a GraphCallTimer installed, each kept step's time outside the graph goes to its `outside`."""
    out = []
    while len(out) < steps:
        sched = steady_scheduler(engine, b, max_tokens=steps + 20)
        for _ in range(3):  # warm-up
            sched.step()
        while len(out) < steps and decoding(sched, b):
            in_graph = graph_timer.total if graph_timer else 0.0
            t0 = time.perf_counter()
            sched.step()
            dt = time.perf_counter() - t0
            if sched.counters["last_batch"] == b and len(sched.running) == b:
                out.append(dt)
                if graph_timer:
                    graph_timer.outside.append(dt - (graph_timer.total - in_graph))
        while sched.has_work():
            sched.step()
    return out


def profile_step(engine, b: int) -> dict:
    """Kernel-launching aten ops in one steady step, and the share of the step outside them."""
    from torch.profiler import ProfilerActivity, profile

    sched = steady_scheduler(engine, b, max_tokens=40)
    for _ in range(3):
        sched.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        sched.step()
        wall = time.perf_counter() - t0
    kernels, kernel_us, aten_calls = 0, 0.0, 0
    for ev in prof.events():
        if ev.name.startswith(COMPILED_KERNELS):  # a kernel inductor generated (COMPILE=on)
            kernels += 1
            kernel_us += ev.cpu_time_total
            continue
        if not ev.name.startswith("aten::"):
            continue
        aten_calls += 1
        if ev.name in NO_KERNEL:
            continue
        if any(c.name.startswith("aten::") and c.name not in NO_KERNEL for c in ev.cpu_children):
            continue  # a composite op: its children are counted
        kernels += 1
        kernel_us += ev.cpu_time_total
    return {"kernels": kernels, "aten_calls": aten_calls,
            "outside_kernels_share": max(0.0, 1 - kernel_us / 1e6 / wall), "profiled_step_s": wall}


def kernel_floor(engine, b: int, width: int = 48, reps: int = 40) -> float:
    """Seconds for only the unavoidable kernels of a decode step at batch b, one eager call each:
    every decoder linear and lm_head with the model's own weights (in layer order, so each weight
    comes from wherever the cache hierarchy keeps it, as in a real step) and one attention per
    layer over `width` positions.  No norms, rotary, cache writes, scheduler or sampling: what no
    host-side cut can go below on this machine."""
    import torch
    import torch.nn.functional as F

    cfg, w = engine.config, engine.weights
    device, dtype = engine.device, engine.dtype
    x = torch.randn(b, cfg.dim, device=device, dtype=dtype)
    hidden = torch.randn(b, w["text.blocks.0.mlp.fc1.weight"].shape[0], device=device, dtype=dtype)
    q = torch.randn(b, cfg.n_heads, 1, cfg.head_dim, device=device, dtype=dtype)
    kv = torch.randn(b, cfg.n_kv_heads, width, cfg.head_dim, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        for i in range(cfg.n_layers):
            name = f"text.blocks.{i}"
            for linear, inp in (("attn.qkv", x), ("attn.proj", x), ("mlp.fc1", x), ("mlp.fc2", hidden)):
                F.linear(inp, w[f"{name}.{linear}.weight"], w[f"{name}.{linear}.bias"])
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=cfg.n_heads != cfg.n_kv_heads)
        F.linear(x, w["text.lm_head.weight"], w["text.lm_head.bias"])

    out = []
    with torch.inference_mode():
        for _ in range(3):
            step()
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def weight_read_floor(engine, reps: int = 40) -> float:
    """Seconds to read every decoder and lm_head weight once, as one contiguous stream (a sum over
    a copy of them all): the memory floor of a batch-1 step on this machine, as ~0.93 ms is the
    full-size model's on an H100.  The tiny-width model's 96 linears hold 12.6 MB of float32, more
    than a core's L2, so on the CPU even this model's step is not free of arithmetic and memory."""
    import torch

    weights = [t for name, t in engine.weights.items()
               if name.startswith(("text.blocks.", "text.lm_head.")) and isinstance(t, torch.Tensor)]
    stream = torch.cat([t.reshape(-1) for t in weights])
    sync = torch.cuda.synchronize if stream.device.type == "cuda" else (lambda: None)
    out = []
    for i in range(reps + 3):
        sync()
        t0 = time.perf_counter()
        stream.sum()
        sync()
        if i >= 3:
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


class GraphCallTimer:
    """Times every call into the compiled graph (CompiledDecode._run) while installed: on a GPU
    that call is one CUDA graph replay, so a step's time outside it is the host time a GPU
    would still wait on.  time_steps fills `outside`, one value per timed step."""

    def __init__(self, compiled):
        self.compiled, self.total, self.outside = compiled, 0.0, []
        run = compiled._run

        def timed(*args):
            t0 = time.perf_counter()
            out = run(*args)
            self.total += time.perf_counter() - t0
            return out
        compiled._run = timed  # an instance attribute: `del` restores the class's method

    def remove(self) -> float:
        """Uninstall; the median seconds per step outside the graph."""
        del self.compiled._run
        return statistics.median(self.outside) if self.outside else 0.0


def worker(args) -> None:
    """Run in a subprocess with one code tree first on sys.path; print one JSON line."""
    sys.path.insert(0, args.code)
    import torch

    global WITH_IMAGES
    WITH_IMAGES = args.image

    torch.set_num_threads(1)
    torch.manual_seed(0)
    engine = overhead_engine(args.device)
    if args.compile:
        import torch._inductor.config

        if args.profile:  # its kernels show in the profile, to count (not in timed rounds: it costs time)
            torch._inductor.config.cpp.enable_kernel_profile = True
        engine.use_compiled_decode()
    result = {}
    for b in args.batches:
        timer = GraphCallTimer(engine.compiled) if args.compile else None
        times = time_steps(engine, b, args.steps, timer)
        result[str(b)] = {"step_s": statistics.median(times), "steps": len(times)}
        if timer is not None:
            result[str(b)]["outside_graph_s"] = timer.remove()
        if args.compile and (engine.compiled.broken or not engine.compiled.compiled_calls):
            raise RuntimeError("the compiled decode step did not run")
        if args.profile:
            result[str(b)].update(profile_step(engine, b))
            result[str(b)]["kernel_floor_s"] = kernel_floor(engine, b)
            result[str(b)]["weight_read_s"] = weight_read_floor(engine)
    print("RESULT " + json.dumps(result))


def run_tree(code: str, args, profile: bool, compiled: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--code", code, "--steps", str(args.steps),
           "--batches", *map(str, args.batches), "--device", args.device] + (["--profile"] if profile else []) + \
        (["--compile"] if compiled else []) + (["--image"] if args.image else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": code}
    from bench.common import run_child  # here, not at the top: a child runs with the other tree's bench first

    return run_child(cmd, env, code)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help="commit to compare against, or 'none'")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--steps", type=int, default=40, help="timed steps per batch size and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two trees")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (a lent GPU: host time per step there)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also this tree with the compiled decode step")
    ap.add_argument("--image", action="store_true", help="queries on images (rows read an image prefix)")
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.quick:
        args.batches, args.steps, args.rounds = [1, 8], 5, 1

    sys.path.insert(0, ROOT)  # this tree's bench package, for the parent only (a child runs the baseline's tree first)
    from bench.common import baseline_tree

    with baseline_tree(args.baseline) as baseline:
        trees = {"this": (ROOT, False)}
        if args.compile:
            trees["compiled"] = (ROOT, True)
        if baseline:
            trees["baseline"] = (baseline, False)
        times = {name: {b: [] for b in args.batches} for name in trees}
        outside_graph = {name: {b: [] for b in args.batches} for name in trees}  # compiled: host time per step
        prof = {}
        for r in range(args.rounds):
            for name, (code, compiled) in trees.items():
                res = run_tree(code, args, profile=(r == 0), compiled=compiled)
                for b in args.batches:
                    if r > 0 or args.rounds == 1:  # round 0 profiles (the compiled graph with kernel profiling)
                        times[name][b].append(res[str(b)]["step_s"])
                        if "outside_graph_s" in res[str(b)]:
                            outside_graph[name][b].append(res[str(b)]["outside_graph_s"])
                    if r == 0:
                        prof.setdefault(name, {})[b] = {k: v for k, v in res[str(b)].items()
                                                        if k not in ("step_s", "outside_graph_s")}

    timed = args.rounds - 1 if args.rounds > 1 else 1
    print(f"random:overhead (24 layers, dim 128), one torch thread, {timed} timed rounds x {args.steps} steps"
          f"{' after a profiled one' if args.rounds > 1 else ''}, "
          f"{'queries on images' if args.image else 'text-only queries'}")
    weight_read = prof["this"][args.batches[0]].get("weight_read_s")
    if weight_read:
        print(f"reading every weight once (the memory floor of a batch-1 step): {weight_read * 1e3:.2f} ms")
    print("(host outside graph: a compiled step's time outside its graph call, what a CUDA graph replay leaves)")
    print("| batch | tree | step ms (median of rounds) | steps/s | kernels/step | aten calls | outside kernels "
          "| host outside graph ms | ratio to baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = {}
    for b in args.batches:
        base = statistics.median(times["baseline"][b]) if "baseline" in times else None
        floor = prof["this"][b].get("kernel_floor_s")
        if floor:  # the same for every tree: the model's kernels on this machine
            print(f"| {b} | kernel floor | {floor * 1e3:.2f} | {1 / floor:.0f} | - | - | 0% | - | "
                  f"{f'{floor / base:.2f}' if base else '-'} |")
            out.setdefault(str(b), {})["kernel_floor"] = {"step_s": floor}
        for name in trees:
            t = statistics.median(times[name][b])
            p = prof[name][b]
            ratio = f"{t / base:.2f}" if base else "-"
            host = statistics.median(outside_graph[name][b]) if outside_graph[name][b] else None
            outside = f"{host * 1e3:.2f}" if host is not None else "-"
            print(f"| {b} | {name} | {t * 1e3:.2f} | {1 / t:.0f} | {p.get('kernels', '-')} | "
                  f"{p.get('aten_calls', '-')} | {p.get('outside_kernels_share', 0):.0%} | {outside} | {ratio} |")
            out.setdefault(str(b), {})[name] = {"step_s": t, "rounds": times[name][b], **p,
                                                **({"outside_graph_s": host} if host is not None else {})}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
