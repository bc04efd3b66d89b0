"""The decode step (one new position per row) as one compiled graph (COMPILE, shared/config.py).

Eager PyTorch runs a decode step of Moondream 2 as ~430 small ops, each paying Python
and dispatch time (docs/performance.md 4.1): on a GPU that host time, not the GPU,
bounds the step.  Here `torch.compile` turns the 24 decoder blocks of a decode step
into one graph: inductor fuses the layer norms, rotary, GELU and residual adds into a
few generated kernels (C++ on the CPU, Triton on CUDA, where mode="reduce-overhead"
also replays the step as a CUDA graph).

The graph covers the batches it can take as fixed-form tensors: one new position per
row, every row gathering its KV positions from the pool (text-only rows on the CPU;
every decode step on CUDA, whose attention is "gather").  Rows that read an image
prefix in place (the CPU's "split" attention), prefills, variants' adapters, Moondream 3
and int8 weights go the eager way.  On the CPU the graph has dynamic batch and context
sizes (no recompile per step); on CUDA too, and there the rows and context columns are
also padded to buckets so that CUDA graphs, one recorded per bucket, serve every step
(padding rows write to the pool's discard position and are dropped); weights and pools
are static addresses.  The CUDA path is untested on a GPU so far (none lent): its
fallback is the eager step.

Compilation happens lazily, on the first decode step of each bucket; its artefacts go
to TORCHINDUCTOR_CACHE_DIR (default: under RUN_DIR).  ANY failure, compiling or
running, logs one warning line and turns the compiled step off for the life of the
process: the eager forward answers that step and every later one, so a compiler
problem never costs a request.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gpu_worker import model as M

log = logging.getLogger("gpu_worker")

COMPILE_CHOICES = ("auto", "on", "off")
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)  # CUDA: padded batch sizes
COLUMN_BUCKET = 256  # CUDA: context columns are padded to a multiple of this


def compile_wanted(setting: str, device: torch.device) -> bool:
    """COMPILE=auto: on for CUDA; off on the CPU.  There the compiled step pays for narrow
    models' text-only decode (docs/performance.md 4.1), but a CPU serves image requests,
    whose rows read their prefix in place ("split") and so decode eagerly anyway, a full-size
    step is its matrix products, and compiling takes minutes at first start."""
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"COMPILE={setting!r} is not one of {', '.join(COMPILE_CHOICES)}")
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def use_cache_dir(directory: str) -> None:
    """Inductor's compiled-kernel cache, unless the environment already names one."""
    if directory and not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.makedirs(directory, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory


# ----------------------------------------------------------------------------- the graph
def decode_blocks(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, write: torch.Tensor, read: torch.Tensor,
                  mask: Optional[torch.Tensor], k_pools: list, v_pools: list, w: dict, cfg) -> torch.Tensor:
    """Moondream 2's decoder blocks for one new position per row (`model._text_blocks`),
    every row reading its positions by gather (no shared prefix read in place): what
    torch.compile traces.  The same arithmetic as text_forward's attention, op for op.
    (An opaque attention op, as vLLM has, measured slower here: a Python custom op
    costs ~80 us per call on the CPU, more than the ops it hides.)"""
    b = x.shape[0]
    heads, width = cfg.n_kv_heads, read.shape[1]
    gqa = cfg.n_heads != cfg.n_kv_heads

    def attend_for_layer(layer):
        k_pool, v_pool = k_pools[layer], v_pools[layer]

        def attend(q, k, v):
            k_pool.index_copy_(1, write, M._as(k.transpose(0, 1).reshape(heads, b, -1), k_pool.dtype))
            v_pool.index_copy_(1, write, M._as(v.transpose(0, 1).reshape(heads, b, -1), v_pool.dtype))
            keys = k_pool.index_select(1, read.view(-1)).view(heads, b, width, -1).transpose(0, 1)
            values = v_pool.index_select(1, read.view(-1)).view(heads, b, width, -1).transpose(0, 1)
            out = F.scaled_dot_product_attention(M._as(q, k_pool.dtype), keys, values, attn_mask=mask, enable_gqa=gqa)
            return M._as(out, x.dtype)
        return attend
    return M._text_blocks(x, w, cfg, cos, sin, attend_for_layer)


class FakeCompileFailure(RuntimeError):
    """Raised by a test's `fault` hook to check the fallback to eager."""


class CompiledDecode:
    """The compiled decode step of one engine, or nothing when it cannot serve a batch.

    `__call__` returns the hidden states (B, 1, C), or None when this batch goes the
    eager way: a prefill, a variant's adapters, Moondream 3, int8 weights, or after a
    failure (then for good, with one warning)."""

    def __init__(self, engine, fault: Optional[Callable[[], None]] = None):
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.fault = fault  # tests: called before each compiled call (raise to inject a failure)
        self.broken = False
        self.compiled_calls = 0
        cfg = engine.config
        self.supported = (not cfg.is_moondream3
                          and all(isinstance(t, torch.Tensor) for t in engine.weights.values()))
        self._fn = None
        self._static_pools: set = set()

    def _compiled(self):
        if self._fn is None:
            # past the recompile limit dynamo would run the function eagerly without a word;
            # raising instead lands in the one-warning fallback, so a step is never silently slow
            torch._dynamo.config.fail_on_recompile_limit_hit = True
            if self.cuda:
                for tensor in self.engine.weights.values():  # weights are not copied into the CUDA graph
                    torch._dynamo.mark_static_address(tensor)
            # sizes are marked dynamic in _run (config ints stay static): one compiled graph (two: batch 1
            # is its own), and on CUDA one CUDA graph recorded per (rows, columns) bucket, which is cheap
            # no runtime checks of the inputs' sizes, strides and alignment in the generated wrapper:
            # ~350 Python asserts per call on the 24-layer graph, which dynamo's guards already cover
            # (indirect-indexing bounds checks stay); CUDA: mode="reduce-overhead" is triton.cudagraphs
            options = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False,
                       **({"triton.cudagraphs": True} if self.cuda else {})}
            self._fn = torch.compile(decode_blocks, options=options, fullgraph=True)
        return self._fn

    def __call__(self, embeds: torch.Tensor, layout: M.BatchLayout, cache: M.PagedKVCache, lora) -> Optional[torch.Tensor]:
        if self.broken or not self.supported or lora is not None or embeds.shape[1] != 1:
            return None
        if layout.groups:  # rows reading an image prefix in place (the CPU's split attention): eager
            return None
        try:
            if self.fault is not None:
                self.fault()
            hidden = self._run(embeds, layout, cache)
        except Exception as err:  # never let the compiler cost a request: eager from now on
            self.broken = True
            log.warning("compiled decode step failed, decoding eagerly from now on: %s: %s",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return None
        self.compiled_calls += 1
        return hidden

    def _run(self, embeds, layout, cache) -> torch.Tensor:
        rope = self.engine.rope
        positions, read, write, mask = layout.positions, layout.read, layout.write, layout.mask
        b = embeds.shape[0]
        if self.cuda:  # bucketed shapes: a few CUDA graphs serve every step
            if id(cache) not in self._static_pools:  # written in place by the graph, never copied
                for tensor in cache.k + cache.v:
                    torch._dynamo.mark_static_address(tensor)
                self._static_pools.add(id(cache))
            embeds, positions, read, write, mask = _pad_to_buckets(embeds, positions, read, write, mask,
                                                                   cache.discard_position)
        # rows, context columns and pool sizes vary: symbolic, so no recompile per step
        for tensor in (embeds, positions, read, write) + ((mask,) if mask is not None else ()):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(read, 1)
        if mask is not None:
            torch._dynamo.maybe_mark_dynamic(mask, 3)
        for tensor in cache.k + cache.v:
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
        cos = rope[0][positions].unsqueeze(1)
        sin = rope[1][positions].unsqueeze(1)
        hidden = self._compiled()(embeds, cos, sin, write, read, mask, cache.k, cache.v,
                                  self.engine.weights, self.engine.config)
        return hidden[:b].clone() if self.cuda else hidden


def _pad_to_buckets(embeds, positions, read, write, mask, discard: int):
    """Rows up to the next ROW_BUCKETS size, columns up to a multiple of COLUMN_BUCKET:
    padding rows and columns point at the pool's discard position and are masked."""
    b, width = read.shape
    rows = next((n for n in ROW_BUCKETS if n >= b), b)
    cols = -(-width // COLUMN_BUCKET) * COLUMN_BUCKET
    if rows == b and cols == width:
        return embeds, positions, read, write, mask
    pad_read = read.new_full((rows, cols), discard)
    pad_read[:b, :width] = read
    pad_mask = torch.zeros(rows, 1, 1, cols, dtype=torch.bool, device=read.device)
    pad_mask[:b, :, :, :width] = True if mask is None else mask
    pad_mask[b:, :, :, 0] = True  # a padding row sees one (discard) column: no all-masked softmax
    pad_write = write.new_full((rows,), discard)
    pad_write[:b] = write
    pad_positions = positions.new_zeros((rows, 1))
    pad_positions[:b] = positions
    pad_embeds = embeds.new_zeros((rows,) + tuple(embeds.shape[1:]))
    pad_embeds[:b] = embeds
    return pad_embeds, pad_positions, pad_read, pad_write, pad_mask
