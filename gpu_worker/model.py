"""Moondream 2's arithmetic: vision encoder, projection, text decoder, region heads.

Plain functions over a dict of weight tensors (keys as in the checkpoint, minus
the leading "model."), following docs/model.md (what Moondream 2 computes, step
by step, and the KV slot layout) and checked against the conformance fixtures.  Everything here takes batches:

- `encode_crops` runs the crops of several images through the vision encoder in
  one forward and returns one 729-token embedding per image;
- `text_forward` runs B sequences of T new positions each against a slot-based KV
  cache (`KVCache`), each sequence at its own position.

Moondream 3 runs through the same functions: its tau scaling and mixture-of-experts MLPs
(`moondream3.py`) are called from `_text_blocks` when the config's family is Moondream 3.

No sampling, prompts or control flow here: that is `programs.py` and `scheduler.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_worker import moondream3
from gpu_worker.checkpoint import ModelConfig

PREFIX_LEN = 730  # BOS + 729 image tokens: attends bidirectionally within itself (config's prefix_attn)
ROTARY_DIMS = 32  # rotary embedding covers the first 32 dims of each head


def _linear(x, w, name):
    weight = w[name + ".weight"]
    if not isinstance(weight, torch.Tensor):  # int8 (gpu_worker/quantize.py): the bias is packed inside
        return weight(x)
    return F.linear(x, weight, w[name + ".bias"])


def _layer_norm(x, w, name):
    return F.layer_norm(x, (x.shape[-1],), w[name + ".weight"], w[name + ".bias"], eps=1e-5)


def _mlp(x, w, name, adapt=None):
    """fc1 -> GELU (tanh) -> fc2; `adapt(linear, u)` adds a variant's low-rank term
    (text blocks only): fc1's input is x, fc2's is the GELU output."""
    h = _linear(x, w, name + ".fc1")
    if adapt is not None:
        h = h + adapt("mlp.fc1", x)
    h = F.gelu(h, approximate="tanh")
    out = _linear(h, w, name + ".fc2")
    if adapt is not None:
        out = out + adapt("mlp.fc2", h)
    return out


# ------------------------------------------------------------------------- vision
def crops_to_input(crops_uint8: torch.Tensor, dtype) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> model input (N, 3, H, W) in [-1, 1]."""
    x = crops_uint8.permute(0, 3, 1, 2).to(torch.float32)
    x = (x / 255.0 - 0.5) / 0.5
    return x.to(dtype)


def _patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, patches, C*patch*patch), channel-major inside a patch."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // patch) * (w // patch), c * patch * patch)


def _bidirectional_attention(x, w, name, n_heads):
    n, t, d = x.shape
    q, k, v = _linear(x, w, name + ".qkv").chunk(3, dim=-1)
    q, k, v = (z.view(n, t, n_heads, d // n_heads).transpose(1, 2) for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return _linear(out.transpose(1, 2).reshape(n, t, d), w, name + ".proj")


def vision_encoder(x: torch.Tensor, w: dict, cfg: ModelConfig) -> torch.Tensor:
    """(N, 3, 378, 378) -> (N, 729, enc_dim) after post_ln."""
    h = _linear(_patchify(x, cfg.patch_size), w, "vision.patch_emb") + w["vision.pos_emb"]
    for i in range(cfg.enc_n_layers):
        b = f"vision.blocks.{i}"
        h = h + _bidirectional_attention(_layer_norm(h, w, b + ".ln1"), w, b + ".attn", cfg.enc_n_heads)
        h = h + _mlp(_layer_norm(h, w, b + ".ln2"), w, b + ".mlp")
    return _layer_norm(h, w, "vision.post_ln")


def _stitch_local_features(local: torch.Tensor, tiling: tuple[int, int], margin: int) -> torch.Tensor:
    """Local crops' (rows*cols, g, g, C) feature grids -> one grid, dropping each crop's
    overlap margin except on sides that are image borders."""
    rows, cols = tiling
    g = local.shape[1]
    step = g - 2 * margin
    out = local.new_zeros(rows * step + 2 * margin, cols * step + 2 * margin, local.shape[-1])
    for i in range(rows):
        for j in range(cols):
            y0 = 0 if i == 0 else margin
            y1 = g if i == rows - 1 else g - margin
            x0 = 0 if j == 0 else margin
            x1 = g if j == cols - 1 else g - margin
            out[i * step + y0:i * step + y1, j * step + x0:j * step + x1] = local[i * cols + j, y0:y1, x0:x1]
    return out


def encode_crops(crop_batches: list[torch.Tensor], tilings: list[tuple[int, int]], w: dict, cfg: ModelConfig) -> list[torch.Tensor]:
    """Several images' crops through one vision forward.  Returns, per image, its
    (729, text_dim) image embedding (the projection's output)."""
    counts = [c.shape[0] for c in crop_batches]
    feats = vision_encoder(torch.cat(crop_batches), w, cfg)
    g = cfg.crop_size // cfg.patch_size
    out = []
    for (start, n), tiling in zip(_spans(counts), tilings):
        global_feats = feats[start]
        local = feats[start + 1:start + n].view(n - 1, g, g, -1)
        grid = _stitch_local_features(local, tiling, cfg.overlap_margin)
        pooled = F.adaptive_avg_pool2d(grid.permute(2, 0, 1), (g, g)).permute(1, 2, 0).reshape(g * g, -1)
        out.append(_mlp(torch.cat([global_feats, pooled], dim=-1), w, "vision.proj_mlp"))
    return out


def _spans(counts):
    start = 0
    for n in counts:
        yield start, n
        start += n


# ------------------------------------------------------------------------- text
def rotary_table(max_context: int, device, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_context, ROTARY_DIMS // 2), computed in float32
    (theta: 10,000 for Moondream 2, 1,500,000 for Moondream 3)."""
    half = ROTARY_DIMS // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, ROTARY_DIMS, 2, dtype=torch.float32)[:half] / ROTARY_DIMS))
    angles = torch.arange(max_context, dtype=torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
    rot = torch.polar(torch.ones_like(angles), angles)
    return rot.real.contiguous().to(device), rot.imag.contiguous().to(device)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, 1, T, 16).  NeoX-style on the first 32 dims."""
    half = ROTARY_DIMS // 2
    x1, x2, rest = x[..., :half], x[..., half:ROTARY_DIMS], x[..., ROTARY_DIMS:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


class KVCache:
    """Keys and values for `n_slots` sequences of up to `context` positions.

    Layout per layer: (n_slots, kv_heads, context + 1, head_dim).  A sequence owns one
    slot for its life; its position p lives at [slot, :, p].  Image prefixes are
    copied in at positions 0..729 (`load_prefix`).  The extra last position is
    the discard position: padding rows of a batch write there and nobody reads it.
    Its dtype is the model's or a narrower one (int8 weights: bfloat16, `Engine.kv_dtype`)."""

    def __init__(self, cfg: ModelConfig, n_slots: int, context: int, device, dtype):
        shape = (n_slots, cfg.n_kv_heads, context + 1, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.n_slots = n_slots
        self.context = context
        self.discard_position = context  # padding rows write here; never read (docs/model.md)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def load_prefix(self, slot: int, prefix: "PrefixKV") -> None:
        n = prefix.length
        for layer in range(len(self.k)):
            self.k[layer][slot, :, :n] = prefix.k[layer]
            self.v[layer][slot, :, :n] = prefix.v[layer]


@dataclass
class PrefixKV:
    """An encoded image: the KV of [BOS, 729 image tokens] for every layer."""

    k: list  # per layer (kv_heads, 730, head_dim)
    v: list
    length: int = PREFIX_LEN

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _text_attention(x, w, name, cfg, cos, sin, attend, adapt=None, tau=None):
    """x (B, T, C). `attend(q, k_new, v_new) -> (B, H, T, head_dim)` stores the new
    keys and values where they belong and attends.  A variant's qkv and proj terms
    both take x, the block's layer-normed input (docs/model.md).  `tau(qkv)` (Moondream 3)
    scales q and v per head before rotary and the cache."""
    b, t, _ = x.shape
    qkv = _linear(x, w, name + ".qkv")
    if adapt is not None:
        qkv = qkv + adapt("attn.qkv", x)
    if tau is not None:
        qkv = tau(qkv)
    q_dim = cfg.n_heads * cfg.head_dim
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    # rotary on the q and k heads in one go (fewer small ops per layer)
    qk = qkv[..., :q_dim + kv_dim].view(b, t, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    qk = _apply_rotary(qk, cos, sin)
    q, k = qk[:, :cfg.n_heads], qk[:, cfg.n_heads:]
    v = qkv[..., q_dim + kv_dim:].view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    out = attend(q, k, v)
    out = _linear(out.transpose(1, 2).reshape(b, t, q_dim), w, name + ".proj")
    if adapt is not None:
        out = out + adapt("attn.proj", x)
    return out


@dataclass(eq=False)
class LoraBatch:
    """The variants' adapters of one batched forward, applied unmerged, per row.

    The adapters present in the batch are concatenated along the rank axis
    (`layers[i][linear] = (A_cat (R, in), B_cat (out, R))`), and `mask` (B, 1, R)
    keeps, for each row, only the rank columns of its own adapter.  So one pair of
    thin matmuls per linear serves every row, base rows included (their mask is all
    zero, which adds exactly 0.0): no merged weights, no batch split per variant."""

    layers: list
    mask: torch.Tensor

    def adapter_for(self, layer: int):
        pairs = self.layers[layer]

        def adapt(linear: str, u: torch.Tensor) -> torch.Tensor:
            a, b = pairs[linear]
            return F.linear(F.linear(u, a) * self.mask, b)
        return adapt


def concat_adapters(adapters: tuple) -> tuple[list, list[tuple[int, int]]]:
    """Distinct adapters -> per-layer concatenated (A, B) and each one's rank columns."""
    spans, start = [], 0
    for adapter in adapters:
        spans.append((start, start + adapter.rank))
        start += adapter.rank
    layers = [{name: (torch.cat([a.layers[i][name][0] for a in adapters]),
                      torch.cat([a.layers[i][name][1] for a in adapters], dim=1))
               for name in adapters[0].layers[i]} for i in range(len(adapters[0].layers))]
    return layers, spans


def _text_blocks(x, w, cfg, cos, sin, attend_for_layer, lora: "LoraBatch | None" = None, positions=None):
    """The decoder blocks.  `positions` (B or 1, T) are the rows' absolute positions,
    needed by Moondream 3's tau (Moondream 2 reads them only through cos/sin)."""
    log_pos = moondream3.log_positions(positions) if cfg.is_moondream3 else None
    for i in range(cfg.n_layers):
        b = f"text.blocks.{i}"
        adapt = lora.adapter_for(i) if lora is not None else None
        h = _layer_norm(x, w, b + ".ln")
        tau = None
        if log_pos is not None:
            def tau(qkv, name=b + ".attn"):
                return moondream3.tau_scale(qkv, w, name, cfg, log_pos)
        attn = _text_attention(h, w, b + ".attn", cfg, cos, sin, attend_for_layer(i), adapt, tau)
        mlp = moondream3.moe_mlp(h, w, b + ".mlp", cfg) if cfg.is_moe_layer(i) else _mlp(h, w, b + ".mlp", adapt)
        x = x + attn + mlp
    return x


def prefill_prefixes(embeds: torch.Tensor, w: dict, cfg: ModelConfig, rope,
                     lora: "LoraBatch | None" = None) -> tuple[torch.Tensor, list[PrefixKV]]:
    """[BOS, image tokens] for B images at positions 0..729, attending bidirectionally.
    Returns the hidden states and each image's PrefixKV (a variant's prefix differs
    from the base model's: its adapters act here too)."""
    b, t, _ = embeds.shape
    if t != cfg.prefix_attn:  # the whole [BOS, image] span is the bidirectional prefix
        raise ValueError(f"an image prefix has {t} positions; this model's prefix_attn is {cfg.prefix_attn}")
    positions = torch.arange(t, device=embeds.device)
    cos = rope[0][positions].view(1, 1, t, -1)
    sin = rope[1][positions].view(1, 1, t, -1)
    ks, vs = [], []

    def attend_for_layer(_layer):
        def attend(q, k, v):
            ks.append(k)
            vs.append(v)
            return F.scaled_dot_product_attention(q, k, v)  # no mask: bidirectional within the prefix
        return attend

    hidden = _text_blocks(embeds, w, cfg, cos, sin, attend_for_layer, lora, positions.view(1, t))
    prefixes = [PrefixKV(k=[k[i] for k in ks], v=[v[i] for v in vs], length=t) for i in range(b)]
    return hidden, prefixes


@dataclass
class SharedPrefixPlan:
    """How one batch reads image prefixes that several of its rows share.

    Rows on an image that no other row of the batch uses ("private" rows) attend
    over their whole slot (their prefix was copied into it).  Rows that share an
    image attend to that image's PrefixKV once for the group, plus their slot from
    position 730 on; both parts are merged exactly (one softmax over both)."""

    private_rows: torch.Tensor  # batch rows attending over their whole slot
    private_slots: torch.Tensor
    private_live: int
    shared_rows: torch.Tensor  # batch rows whose image prefix is read from `groups`
    shared_slots: torch.Tensor
    shared_live: int
    groups: list  # [(PrefixKV, indices into shared_rows)]


def text_forward(embeds: torch.Tensor, positions: torch.Tensor, write_positions: torch.Tensor,
                 rows: "slice | torch.Tensor", live: int, cache: KVCache, w: dict, cfg: ModelConfig, rope,
                 plan: "SharedPrefixPlan | None" = None, lora: "LoraBatch | None" = None) -> torch.Tensor:
    """B rows, each feeding T new positions `positions` (B, T), attending causally to
    everything at or before each position in its slot; keys/values are stored at
    `write_positions` (equal to positions, except padding rows that write to the
    cache's discard position).  `rows` names the cache slots of the B rows: a slice
    when they are consecutive slots (read in place, no copy) or an index tensor
    (gathered).  `live` bounds the positions read.  With a `plan`, rows sharing an
    image read its prefix once (see SharedPrefixPlan).  `lora` adds each row's
    variant adapter (see LoraBatch).  Returns hidden (B, T, C) before post_ln."""
    b, t, _ = embeds.shape
    cos = rope[0][positions].unsqueeze(1)  # (B, 1, T, 16)
    sin = rope[1][positions].unsqueeze(1)
    key_pos = torch.arange(live, device=embeds.device)
    mask = key_pos.view(1, 1, 1, live) <= positions.view(b, 1, t, 1)  # (B, 1, T, live)
    # a lone decode row sees every position up to `live`: the unmasked kernel is much faster
    sdpa_mask = None if b == 1 and t == 1 else mask
    if isinstance(rows, slice):
        slot_index = torch.arange(rows.start, rows.stop, device=embeds.device).view(b, 1)
    else:
        slot_index = rows.view(b, 1)
    gqa = cfg.n_heads != cfg.n_kv_heads

    def attend_for_layer(layer):
        k_cache, v_cache = cache.k[layer], cache.v[layer]

        def attend(q, k, v):
            # a cache in a narrower dtype than the model's (int8 weights: bfloat16) is
            # read in its own dtype; with equal dtypes the casts are no-ops
            k_cache[slot_index, :, write_positions] = k.permute(0, 2, 1, 3).to(k_cache.dtype)
            v_cache[slot_index, :, write_positions] = v.permute(0, 2, 1, 3).to(v_cache.dtype)
            return attend_cached(q.to(k_cache.dtype)).to(q.dtype)

        def attend_cached(q):
            if plan is None:
                return F.scaled_dot_product_attention(q, k_cache[rows, :, :live], v_cache[rows, :, :live],
                                                      attn_mask=sdpa_mask, enable_gqa=gqa)
            out = torch.zeros_like(q)  # padding rows stay zero
            if len(plan.private_rows):
                r, n = plan.private_rows, plan.private_live
                out[r] = F.scaled_dot_product_attention(
                    q[r], k_cache[plan.private_slots, :, :n], v_cache[plan.private_slots, :, :n],
                    attn_mask=mask[r, :, :, :n], enable_gqa=gqa)
            r, n = plan.shared_rows, plan.shared_live
            prefix_len = plan.groups[0][0].length
            parts = [(p.k[layer], p.v[layer], idx) for p, idx in plan.groups]
            out[r] = _attention_with_shared_prefixes(
                q[r], k_cache[plan.shared_slots, :, prefix_len:n], v_cache[plan.shared_slots, :, prefix_len:n],
                mask[r, :, :, prefix_len:n], parts)
            return out
        return attend

    return _text_blocks(embeds, w, cfg, cos, sin, attend_for_layer, lora, positions)


def _attention_with_shared_prefixes(q, k_slot, v_slot, mask, prefixes):
    """softmax(q . [prefix keys, slot keys]) . [prefix values, slot values], computed
    in two parts merged with a common maximum, so rows that share a prefix read it
    once.  q (B, H, T, D); slot keys (B, H, L, D); prefixes [(k (H, P, D), v, rows)].
    Scores and sums are float32 whatever the model dtype (as fused kernels do)."""
    b, h, t, d = q.shape
    scale = d ** -0.5
    scores = torch.matmul(q, k_slot.transpose(-1, -2)).float() * scale  # (B, H, T, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    prefix_scores = []
    for k_p, _, idx in prefixes:
        # the group's rows side by side as one (H, n*T, D) matrix: one read of k_p for all of them
        q_g = q[idx].permute(1, 0, 2, 3).reshape(h, -1, d)
        s_p = torch.matmul(q_g, k_p.transpose(-1, -2)).float() * scale  # (H, n*T, P)
        s_p = s_p.view(h, len(idx), t, -1).permute(1, 0, 2, 3)  # (n, H, T, P)
        top[idx] = torch.maximum(top[idx], s_p.amax(dim=-1, keepdim=True))
        prefix_scores.append(s_p)
    weights = torch.exp(scores - top)
    num = torch.matmul(weights.to(v_slot.dtype), v_slot).float()
    den = weights.sum(dim=-1, keepdim=True)
    for (_, v_p, idx), s_p in zip(prefixes, prefix_scores):
        w_p = torch.exp(s_p - top[idx])
        den[idx] += w_p.sum(dim=-1, keepdim=True)
        part = torch.matmul(w_p.to(v_p.dtype).permute(1, 0, 2, 3).reshape(h, -1, w_p.shape[-1]), v_p)  # (H, n*T, D)
        num[idx] += part.float().view(h, len(idx), t, d).permute(1, 0, 2, 3)
    return (num / den).to(q.dtype)


def lm_logits(hidden_last: torch.Tensor, w: dict) -> torch.Tensor:
    """(B, C) raw hidden of the last position -> (B, vocab) logits."""
    return _linear(_layer_norm(hidden_last, w, "text.post_ln"), w, "text.lm_head")


# ------------------------------------------------------------------------- region heads
def encode_coordinates(values: torch.Tensor, w: dict) -> torch.Tensor:
    """(N,) coordinates in [0, 1] -> (N, text_dim) embeddings."""
    f = 2 * math.pi * values.view(-1, 1).to(w["region.coord_features"].dtype) @ w["region.coord_features"]
    return _linear(torch.cat([f.cos(), f.sin()], dim=-1), w, "region.coord_encoder")


def encode_sizes(sizes: torch.Tensor, w: dict) -> torch.Tensor:
    """(N, 2) (width, height) -> (N, text_dim) embeddings."""
    f = 2 * math.pi * sizes.to(w["region.size_features"].dtype) @ w["region.size_features"]
    return _linear(torch.cat([f.cos(), f.sin()], dim=-1), w, "region.size_encoder")


def _region_decoder(hidden: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    """Moondream 2's decoders are two-layer MLPs; Moondream 3's a single linear, after a
    LayerNorm when the checkpoint has one (Moondream 3.1's `region_model.ln`)."""
    if "region.ln.weight" in w:
        hidden = _layer_norm(hidden, w, "region.ln")
    if name + ".weight" in w:
        return _linear(hidden, w, name)
    return _mlp(hidden, w, name)


def decode_coordinate_bins(hidden: torch.Tensor, w: dict) -> torch.Tensor:
    """(N, C) raw hidden -> (N,) argmax coordinate bins (value = bin / 1024)."""
    return _region_decoder(hidden, w, "region.coord_decoder").argmax(dim=-1)


def decode_size_bins(hidden: torch.Tensor, w: dict) -> torch.Tensor:
    """(N, C) raw hidden -> (N, 2) argmax (width, height) bins."""
    logits = _region_decoder(hidden, w, "region.size_decoder")
    return logits.view(hidden.shape[0], 2, -1).argmax(dim=-1)


def size_from_bin(bin_index: int) -> float:
    """Size bins are log-scale: 2^(bin/1023 * 10 - 10)."""
    return float(torch.pow(torch.tensor(2.0), torch.tensor(bin_index, dtype=torch.float32) / 1023.0 * 10.0 - 10.0))
