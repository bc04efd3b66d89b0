"""int8 weights for the CPU (MOONDREAM_DTYPE=int8): a quarter of the bytes per decode step.

The big linears of the text decoder and the vision encoder (and lm_head) are
converted once, at load time, to int8 with one scale per output channel, and run
with PyTorch's own quantized kernel `quantized.linear_dynamic`: each call
quantizes its input on the fly, multiplies in int8 and returns float32.  The
vision encoder's linears are packed for the oneDNN backend, the text decoder's
for fbgemm (see `_engine_for`).  Decode
steps are memory-bound, so reading 1 byte per weight instead of 4 is most of the
win; the vision encoder and prefix prefill are compute-bound, where fbgemm's int8
GEMM is faster than float32 as well.

Moondream 3's experts are converted too, one Int8Linear per expert (`Int8Experts`);
its router and tau weights are small and stay float32.  Conversion happens tensor by
tensor while loading (`Int8Converter`), so the float32 model (37 GB for Moondream 3)
never exists in memory at once.

Kept in float32: embeddings, layer norms, the patch embedding, the region heads
(coordinates must stay exact enough to land in the right bins) and variants'
adapters.  The KV cache is bfloat16 (INT8_KV_DTYPE).  Answers differ from float32's;
docs/performance.md publishes how much.
"""
from __future__ import annotations

import gc
import warnings

import torch

# Keys and values (KV cache, encoded images) in bfloat16: attention over ~800 cached
# positions reads them all every decode step, and PyTorch's CPU attention kernel reads
# bfloat16 (avx512_bf16) over twice as fast as float32; half the cache memory besides.
INT8_KV_DTYPE = torch.bfloat16

# Linears converted (keys without ".weight"), by the checkpoint's names.
_TEXT_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_VISION_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class Int8Linear:
    """A linear's weight (and bias) packed for the quantized engine chosen by
    `quantize_weights` (packing is per engine).  `model._linear` calls it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        w = weight.detach().float().contiguous()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        zero_points = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            # quantized tensors are deprecated as a public type; the packed linear is still
            # PyTorch's own int8 CPU kernel and needs one to be built
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.float().contiguous())
        self.shape = tuple(weight.shape)
        self.nbytes = w.numel() + 4 * w.shape[0] + (0 if bias is None else 4 * bias.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.dtype != torch.float32:
            flat = flat.float()
        out = torch.ops.quantized.linear_dynamic(flat.contiguous(), self.packed)
        return out.view(*x.shape[:-1], out.shape[-1])


class Int8Experts:
    """A mixture-of-experts layer's stacked weights [expert, out, in] as one Int8Linear per
    expert (no bias); `experts[e](x)` is x @ W_e^T, as gpu_worker/moondream3.py expects."""

    def __init__(self, stacked: torch.Tensor):
        self.experts = [Int8Linear(stacked[e], None) for e in range(stacked.shape[0])]
        self.shape = tuple(stacked.shape)
        self.nbytes = sum(e.nbytes for e in self.experts)

    def __getitem__(self, expert: int) -> Int8Linear:
        return self.experts[expert]


def quantizable(cfg) -> dict[str, list[str]]:
    """The linears converted, by the part of the model they belong to; "experts" are
    Moondream 3's stacked expert weights (converted to Int8Experts)."""
    text, experts = [], []
    for i in range(cfg.n_layers):
        b = f"text.blocks.{i}"
        text += [f"{b}.attn.qkv", f"{b}.attn.proj"]
        if cfg.is_moe_layer(i):
            experts += [f"{b}.mlp.fc1", f"{b}.mlp.fc2"]
        else:
            text += [f"{b}.mlp.fc1", f"{b}.mlp.fc2"]
    text.append("text.lm_head")
    vision = [f"vision.blocks.{i}.{lin}" for i in range(cfg.enc_n_layers) for lin in _VISION_LINEARS]
    return {"text": text, "vision": vision + ["vision.proj_mlp.fc1", "vision.proj_mlp.fc2"], "experts": experts}


class Int8Converter:
    """Called by the loader after each tensor it adds (`convert(weights, name)`): once a
    converted linear's weight and bias (experts: the weight) are both in, they are replaced
    by their int8 form, so at most one float32 linear is held at a time."""

    def __init__(self, cfg):
        self.part_of = {name: part for part, names in quantizable(cfg).items() for name in names}

    def __call__(self, weights: dict, name: str) -> None:
        base = name.rsplit(".", 1)[0]
        part = self.part_of.get(base)
        if part is None or not isinstance(weights.get(base + ".weight"), torch.Tensor):
            return
        torch.backends.quantized.engine = _engine_for(part)
        if part == "experts":
            weights[base + ".weight"] = Int8Experts(weights.pop(base + ".weight"))
        elif base + ".bias" in weights:
            weights[base + ".weight"] = Int8Linear(weights.pop(base + ".weight"), weights.pop(base + ".bias"))


def _engine_for(part: str) -> str:  # "experts" are text decoder weights: fbgemm
    """Which of PyTorch's quantized backends packs a part's linears (packing is per backend;
    the kernel follows the packed weight, so both can serve one model).  The vision encoder
    multiplies hundreds of rows per crop: oneDNN, 2-4x faster there, though it keeps a second
    copy of each weight.  The text decoder mostly multiplies one row per sequence (decode) and
    holds most of the weights: fbgemm, as fast at one row and with one copy."""
    engines = torch.backends.quantized.supported_engines
    preferred = ("onednn", "x86", "fbgemm") if part == "vision" else ("fbgemm", "x86", "onednn")
    engine = next((e for e in preferred if e in engines), None)
    if engine is None:
        raise RuntimeError(f"this PyTorch build has no x86 quantized engine (it has {engines})")
    return engine


def quantize_weights(weights: dict, cfg) -> dict:
    """Replace the big linears' float weights by Int8Linear, one at a time, freeing each
    float32 copy as it goes; the bias travels inside the packed weight."""
    for part, names in quantizable(cfg).items():
        torch.backends.quantized.engine = _engine_for(part)
        for name in names:
            weight = weights.pop(name + ".weight")
            if part == "experts":
                weights[name + ".weight"] = Int8Experts(weight)
            else:
                bias = weights.pop(name + ".bias", None)
                weights[name + ".weight"] = Int8Linear(weight, bias)
                del bias
            del weight
    gc.collect()
    _give_memory_back()
    return weights


def _give_memory_back() -> None:
    """The float32 copies are freed; ask glibc to return their pages to the OS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
