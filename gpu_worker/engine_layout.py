"""Moondream 3 checkpoints in the layout Moondream's own engine (kestrel) reads: the
preview's `model_fp8.pt` and Moondream 3.1's `model.safetensors`.  Their tensors are
mapped on load to this repository's names (the reference's layout, `model.` dropped):

| engine layout | ours |
|---|---|
| `text_model.transformer.embd.wte.weight` | `text.wte` |
| `text_model.transformer.h.N.{ln, mixer.Wqkv, mixer.out_proj}` | `text.blocks.N.{ln, attn.qkv, attn.proj}` |
| `...h.N.tau_wq`, `tau_wv` (or both stacked as `tau_wqwv`), `tau_alpha` | `text.blocks.N.attn.tau.{wq, wv, alpha}` |
| `...h.N.gate`, `mlp.experts.weight`, `mlp.output_experts.weight` | `...mlp.router`, `mlp.fc1.weight`, `mlp.fc2.weight` |
| `...h.N.moe_quant.{up_scale, down_scale}` | FP8 experts' per-channel scales: weight = fp8 x scale |
| `...h.N.mlp.{fc1, fc2}` (dense layers) | the same |
| `text_model.lm_head.{ln, linear}` | `text.post_ln`, `text.lm_head` |
| `vision_encoder.encoder.model.visual.{patch_embed.linear, pos_embed, norm}` | `vision.{patch_emb, pos_emb, post_ln}` |
| `vision_encoder.encoder.model.visual.blocks.N.{norm1, norm2, attn.*, mlp.*}` | `vision.blocks.N.{ln1, ln2, attn.*, mlp.*}` |
| `vision_encoder.projection.mlp.{fc1, fc2}` | `vision.proj_mlp.{fc1, fc2}` |
| `region_model.{coordinate_encoder, coordinate_head, size_encoder, size_head}` | `region.{coord_encoder, coord_decoder, size_encoder, size_decoder}` |
| `region_model.{coordinate_features, size_features}.weight` (stored transposed) | `region.{coord_features, size_features}` |
| `region_model.ln` (3.1 only, when present) | `region.ln`: applied before the region decoders |

Written from public code (see ../shared/docs/moondream3-model.md, last section) and checked
by converting a fixture model into this layout; not yet against a real 3.1 checkpoint.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

ENGINE_PREFIXES = ("text_model.", "vision_encoder.", "region_model.")

_RENAMES = [  # (pattern on the engine key, our name), applied in order; first match wins
    (r"text_model\.transformer\.embd\.wte\.weight", "text.wte"),
    (r"text_model\.lm_head\.ln\.(weight|bias)", r"text.post_ln.\1"),
    (r"text_model\.lm_head\.linear\.(weight|bias)", r"text.lm_head.\1"),
    (r"text_model\.transformer\.h\.(\d+)\.ln\.(weight|bias)", r"text.blocks.\1.ln.\2"),
    (r"text_model\.transformer\.h\.(\d+)\.mixer\.Wqkv\.(weight|bias)", r"text.blocks.\1.attn.qkv.\2"),
    (r"text_model\.transformer\.h\.(\d+)\.mixer\.out_proj\.(weight|bias)", r"text.blocks.\1.attn.proj.\2"),
    (r"text_model\.transformer\.h\.(\d+)\.tau_(wq|wv|alpha)", r"text.blocks.\1.attn.tau.\2"),
    (r"text_model\.transformer\.h\.(\d+)\.gate\.(weight|bias)", r"text.blocks.\1.mlp.router.\2"),
    (r"text_model\.transformer\.h\.(\d+)\.mlp\.experts\.weight", r"text.blocks.\1.mlp.fc1.weight"),
    (r"text_model\.transformer\.h\.(\d+)\.mlp\.output_experts\.weight", r"text.blocks.\1.mlp.fc2.weight"),
    (r"text_model\.transformer\.h\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"text.blocks.\1.mlp.\2.\3"),
    (r"vision_encoder\.encoder\.model\.visual\.patch_embed\.linear\.(weight|bias)", r"vision.patch_emb.\1"),
    (r"vision_encoder\.encoder\.model\.visual\.pos_embed", "vision.pos_emb"),
    (r"vision_encoder\.encoder\.model\.visual\.norm\.(weight|bias)", r"vision.post_ln.\1"),
    (r"vision_encoder\.encoder\.model\.visual\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision.blocks.\1.ln\2.\3"),
    (r"vision_encoder\.encoder\.model\.visual\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
     r"vision.blocks.\1.\2.\3"),
    (r"vision_encoder\.projection\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision.proj_mlp.\1.\2"),
    (r"region_model\.coordinate_encoder\.(weight|bias)", r"region.coord_encoder.\1"),
    (r"region_model\.coordinate_head\.(weight|bias)", r"region.coord_decoder.\1"),
    (r"region_model\.size_encoder\.(weight|bias)", r"region.size_encoder.\1"),
    (r"region_model\.size_head\.(weight|bias)", r"region.size_decoder.\1"),
    (r"region_model\.coordinate_features\.weight", "region.coord_features"),
    (r"region_model\.size_features\.weight", "region.size_features"),
    (r"region_model\.ln\.(weight|bias)", r"region.ln.\1"),
]
_COMPILED = [(re.compile(pattern + r"\Z"), ours) for pattern, ours in _RENAMES]
_TRANSPOSED = ("region.coord_features", "region.size_features")
_SCALE = re.compile(r"text_model\.transformer\.h\.(\d+)\.moe_quant\.(up|down)_scale\Z")
_FUSED_TAU = re.compile(r"text_model\.transformer\.h\.(\d+)\.tau_wqwv\Z")


def is_engine_layout(keys) -> bool:
    return any(k.startswith(ENGINE_PREFIXES) for k in keys)


def our_name(key: str) -> str | None:
    for pattern, ours in _COMPILED:
        if pattern.match(key):
            return pattern.sub(ours, key)
    return None


def sources(keys, read: Callable[[str], torch.Tensor]) -> dict[str, tuple[str, Callable[[], torch.Tensor]]]:
    """Our weight name -> (the engine key it comes from, a loader of the tensor in our layout).
    `read(key)` returns the checkpoint's tensor as stored."""
    keys = list(keys)
    scales = {}
    for key in keys:
        m = _SCALE.match(key)
        if m:
            scales[(m.group(1), "fc1" if m.group(2) == "up" else "fc2")] = key
    out: dict[str, tuple[str, Callable[[], torch.Tensor]]] = {}
    for key in keys:
        m = _FUSED_TAU.match(key)
        if m:  # tau_wq and tau_wv stacked row-wise: [2 x heads, qkv width]
            for half, name in enumerate(("wq", "wv")):
                out[f"text.blocks.{m.group(1)}.attn.tau.{name}"] = (key, _half_of(read, key, half))
            continue
        name = our_name(key)
        if name is None:
            continue
        if name in _TRANSPOSED:
            out[name] = (key, lambda key=key: read(key).t().contiguous())
            continue
        expert = re.match(r"text\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.weight\Z", name)
        scale_key = scales.get((expert.group(1), expert.group(2))) if expert else None
        if scale_key is not None:
            out[name] = (key, lambda key=key, scale_key=scale_key: dequantize_fp8(read(key), read(scale_key)))
        else:
            out[name] = (key, lambda key=key: read(key))
    return out


def _half_of(read, key: str, half: int):
    def load():
        both = read(key)
        rows = both.shape[0] // 2
        return both[half * rows:(half + 1) * rows].contiguous()
    return load


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 (e4m3) experts [expert, out, in] with one scale per expert and output channel:
    weight x scale, in float32.  Raw bytes stored as uint8 are read as e4m3."""
    if weight.dtype == torch.uint8:
        weight = weight.view(torch.float8_e4m3fn)
    scale = scale.float().reshape(weight.shape[0], weight.shape[1], 1)
    return weight.float() * scale
