"""Moondream 3's deltas to Moondream 2's text decoder (../shared/docs/moondream3-model.md):

- `tau_scale`: every attention layer scales each head's queries and values by a
  learned temperature that depends on the token and its position, before rotary
  and before the values go into the KV cache;
- `moe_mlp`: layers from `moe_start_layer` on replace the dense MLP by a mixture of
  experts.  A batch's rows are grouped by the experts they are routed to and each
  active expert runs once, on all of its rows (no loop over tokens, no expert run
  on rows that were not routed to it).

model.py calls both from its shared text path when the config's family is
Moondream 3; nothing else about attention or the KV cache changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def log_positions(positions: torch.Tensor) -> torch.Tensor:
    """ln(p + 1) of absolute positions, in float32 (the tau position term's input)."""
    return torch.log(positions.to(torch.float32) + 1.0)


def tau_scale(qkv: torch.Tensor, w: dict, name: str, cfg, log_pos: torch.Tensor) -> torch.Tensor:
    """qkv (B, T, q|k|v) -> the same with each head of q and of v multiplied by its
    temperature: tanh(GELU(qkv) . w_head) + 0.5 + sigmoid(alpha_head * ln(p + 1)).
    `log_pos` is (B, T) or (1, T).  k is not scaled."""
    b, t, _ = qkv.shape
    hd = cfg.head_dim
    q_dim, kv_dim = cfg.n_heads * hd, cfg.n_kv_heads * hd
    features = F.gelu(qkv, approximate="none" if cfg.tau_gelu == "erf" else "tanh")
    a_q = torch.tanh(F.linear(features, w[name + ".tau.wq"]))  # (B, T, heads)
    a_v = torch.tanh(F.linear(features, w[name + ".tau.wv"]))
    position_term = 1.0 + (torch.sigmoid(w[name + ".tau.alpha"].float() * log_pos.unsqueeze(-1)) - 0.5)
    position_term = position_term.to(qkv.dtype)
    q = qkv[..., :q_dim].view(b, t, cfg.n_heads, hd) * (a_q + position_term).unsqueeze(-1)
    v = qkv[..., q_dim + kv_dim:].view(b, t, cfg.n_kv_heads, hd) * (a_v + position_term).unsqueeze(-1)
    return torch.cat([q.reshape(b, t, q_dim), qkv[..., q_dim:q_dim + kv_dim], v.reshape(b, t, kv_dim)], dim=-1)


def route(x: torch.Tensor, w: dict, name: str, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) -> the experts each row is routed to (N, k), by descending router logit,
    and their weights (N, k): a float32 softmax over the k selected logits, cast to
    x's dtype.  Equal logits at the cut go to the lower expert index (a stable sort)."""
    router = w[name + ".router.weight"]
    logits = F.linear(x.to(router.dtype), router, w[name + ".router.bias"])
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    k = cfg.experts_per_token
    weights = torch.softmax(sorted_logits[:, :k].float(), dim=-1).to(x.dtype)
    return order[:, :k], weights


def expert_linear(stacked, expert: int, x: torch.Tensor) -> torch.Tensor:
    """x @ W_expert^T: `stacked` is a 3-D tensor [expert, out, in], or int8 experts
    (gpu_worker/quantize.py) indexed the same way."""
    if isinstance(stacked, torch.Tensor):
        return F.linear(x, stacked[expert])
    return stacked[expert](x)


def moe_mlp(h: torch.Tensor, w: dict, name: str, cfg) -> torch.Tensor:
    """(B, T, C) layer-normed block input -> the MoE branch's output (B, T, C).
    Each row's output is the weighted sum of its experts' outputs, added in
    expert-index order whatever the batch, so a row's result does not depend on
    which other rows share its batch."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    experts, weights = route(x, w, name, cfg)
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # the (row, choice) pairs grouped by expert
    rows_in_order = order // k
    weights_in_order = weights.reshape(-1)[order].unsqueeze(-1)
    counts = torch.bincount(flat, minlength=cfg.n_experts).tolist()  # one host sync per layer
    fc1, fc2 = w[name + ".fc1.weight"], w[name + ".fc2.weight"]
    inner = cfg.expert_inner_dim
    out = torch.zeros_like(x)
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = rows_in_order[start:start + n]
        u = expert_linear(fc1, expert, x[rows])
        gated = F.gelu(u[:, :inner]) * (u[:, inner:] + 1.0)  # the exact (erf) GELU
        y = expert_linear(fc2, expert, gated).to(x.dtype)
        out.index_add_(0, rows, y * weights_in_order[start:start + n])
        start += n
    return out.view(shape)
