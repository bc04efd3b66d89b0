"""int8 weights for the CPU (MOONDREAM_DTYPE=int8): a quarter of the bytes per decode step.

The big linears of the text decoder and the vision encoder (and lm_head) are
converted once, at load time, to int8 with one scale per output channel, and run
with PyTorch's own quantized kernel `quantized.linear_dynamic` on its oneDNN
backend (fbgemm where oneDNN is missing): each call quantizes its input on the
fly, multiplies in int8 and returns float32.  oneDNN measured 2-4x faster than
fbgemm here at 32 and 730 rows (the batched decode, the prefix prefill and the
vision encoder), and the same at one row.  Decode
steps are memory-bound, so reading 1 byte per weight instead of 4 is most of the
win; the vision encoder and prefix prefill are compute-bound, where fbgemm's int8
GEMM is faster than float32 as well.

Kept in float32: embeddings, layer norms, the patch embedding, the region heads
(coordinates must stay exact enough to land in the right bins) and variants'
adapters.  Answers differ from float32's; docs/performance.md publishes how much.
"""
from __future__ import annotations

import gc
import warnings

import torch

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


def quantizable(cfg) -> list[str]:
    names = [f"text.blocks.{i}.{lin}" for i in range(cfg.n_layers) for lin in _TEXT_LINEARS]
    names += [f"vision.blocks.{i}.{lin}" for i in range(cfg.enc_n_layers) for lin in _VISION_LINEARS]
    names += ["vision.proj_mlp.fc1", "vision.proj_mlp.fc2", "text.lm_head"]
    return names


def quantize_weights(weights: dict, cfg) -> dict:
    """Replace the big linears' float weights by Int8Linear, one at a time, freeing each
    float32 copy as it goes; the bias travels inside the packed weight."""
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("onednn", "x86", "fbgemm") if e in engines), None)
    if engine is None:
        raise RuntimeError(f"this PyTorch build has no x86 quantized engine (it has {engines})")
    torch.backends.quantized.engine = engine
    for name in quantizable(cfg):
        weight = weights.pop(name + ".weight")
        bias = weights.pop(name + ".bias", None)
        weights[name + ".weight"] = Int8Linear(weight, bias)
        del weight, bias
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
