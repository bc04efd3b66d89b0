"""Moondream 2's arithmetic: vision encoder, projection, text decoder, region heads.

Plain functions over a dict of weight tensors (keys as in the checkpoint, minus
the leading "model."), following docs/model.md (what Moondream 2 computes, step
by step, and the KV block layout) and checked against the conformance fixtures.  Everything here takes batches:

- `encode_crops` runs the crops of several images through the vision encoder in
  one forward and returns one 729-token embedding per image;
- `text_forward` runs B sequences of T new positions each against the paged KV
  cache (`PagedKVCache`: one pool of blocks, a block table per sequence, encoded
  image prefixes shared by reference), each sequence at its own position.

Moondream 3 runs through the same functions: its tau scaling and mixture-of-experts MLPs
(`moondream3.py`) are called from `_text_blocks` when the config's family is Moondream 3.

No sampling, prompts or control flow here: that is `programs.py` and `scheduler.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from gpu_worker import moondream3
from gpu_worker.checkpoint import ModelConfig

PREFIX_LEN = 730  # BOS + 729 image tokens: attends bidirectionally within itself (config's prefix_attn)
ROTARY_DIMS = 32  # rotary embedding covers the first 32 dims of each head
DEFAULT_BLOCK_SIZE = 16  # positions per KV block (KV_BLOCK_SIZE), as in vLLM


def kv_bytes_per_position(cfg: ModelConfig, dtype) -> int:
    """Keys and values of one position in every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


def _linear(x, w, name):
    weight = w[name + ".weight"]
    if not isinstance(weight, torch.Tensor):  # int8 (gpu_worker/quantize.py): the bias is packed inside
        return weight(x)
    return F.linear(x, weight, w[name + ".bias"])


def _as(x: torch.Tensor, dtype) -> torch.Tensor:
    """x in dtype; no call at all when it already is (a no-op .to still costs host time every layer)."""
    return x if x.dtype == dtype else x.to(dtype)


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
    """x (B, H, T, D); cos/sin (B, 1, T, 16), or the whole-head tables of `rotary_for_heads`
    (B, 1, T, D), which _text_blocks builds once per forward.  NeoX-style on the first 32 dims."""
    if cos.shape[-1] != x.shape[-1]:
        cos, sin = rotary_for_heads(cos, sin, x.shape[-1], x.dtype)
    # x * C + swap(x) * S, with swap exchanging the two rotary halves: three kernels instead of
    # seven, and bit-identical to the halves formula (a - b*s == a + b*(-s); beyond the rotary
    # dims C is 1 and S is 0, so those dims pass through unchanged)
    return x * cos + x.index_select(-1, _rotary_swap(x.shape[-1], x.device)) * sin


def rotary_for_heads(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The (.., 16) cos/sin tables widened to whole heads for `_apply_rotary`:
    C = [cos, cos, 1...], S = [-sin, sin, 0...], in the activations' dtype."""
    cos, sin = cos.to(dtype), sin.to(dtype)
    rest = cos.shape[:-1] + (head_dim - ROTARY_DIMS,)
    ones, zeros = cos.new_ones(rest), cos.new_zeros(rest)
    return torch.cat([cos, cos, ones], dim=-1), torch.cat([-sin, sin, zeros], dim=-1)


_SWAPS: dict = {}


def _rotary_swap(head_dim: int, device) -> torch.Tensor:
    """Index that swaps the two rotary halves of a head and keeps the other dims."""
    key = (head_dim, str(device))
    if key not in _SWAPS:
        half = ROTARY_DIMS // 2
        order = list(range(half, ROTARY_DIMS)) + list(range(half)) + list(range(ROTARY_DIMS, head_dim))
        _SWAPS[key] = torch.tensor(order, device=device)
    return _SWAPS[key]


class PoolExhausted(RuntimeError):
    """No free block where one was needed: admission reserves blocks so that this never
    happens to a running sequence; raised only if that promise is broken."""


class BlockAllocator:
    """Which of `n_blocks` KV blocks are free: pure bookkeeping, no tensors (the capacity
    benchmark runs it alone).  Sequences take the lowest free blocks; an encoded image
    takes a run of consecutive blocks from the top when one is free, so that attention
    can read its prefix in place as one slice (docs/model.md, "KV blocks")."""

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.is_free = bytearray(b"\x01") * n_blocks
        self.n_free = n_blocks
        self.reserved = 0  # blocks promised to running sequences, not yet taken

    def available(self) -> int:
        """Blocks a new request may count on: free ones not promised to running sequences."""
        return self.n_free - self.reserved

    def take(self, n: int) -> list[int]:
        if n > self.n_free:
            raise PoolExhausted(f"{n} KV blocks wanted, {self.n_free} free")
        out, i = [], 0
        while len(out) < n:
            i = self.is_free.find(1, i)
            out.append(i)
            i += 1
        for b in out:
            self.is_free[b] = 0
        self.n_free -= n
        return out

    def take_run(self, n: int) -> list[int]:
        """n consecutive blocks, the highest run free; scattered blocks when no run is."""
        start = self.is_free.rfind(b"\x01" * n) if n else -1
        if start < 0:
            return self.take(n)
        self.is_free[start:start + n] = b"\x00" * n
        self.n_free -= n
        return list(range(start, start + n))

    def give_back(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.is_free[b]:
                raise RuntimeError(f"KV block {b} freed twice")
            self.is_free[b] = 1
        self.n_free += len(blocks)


def blocks_for(positions: int, block_size: int) -> int:
    return -(-positions // block_size)


@dataclass(eq=False)
class PooledPrefix:
    """An encoded image's prefix in the pool: `length` positions in `blocks` (a run of
    consecutive blocks when one was free), shared by reference.  `holders` counts the
    sequences using it plus one while the image cache keeps it; at zero its blocks go
    back to the pool.  The positions past `length` in its last block stay unused:
    sequences write their own positions into their own blocks (no block is shared
    partly filled, so nothing needs copying on write)."""

    blocks: list
    length: int
    index: torch.Tensor  # pool indexes of its positions
    run: Optional[slice] = None  # the same as one slice of the pool when its blocks are consecutive
    holders: int = 0
    cached: bool = False

    def shared(self) -> bool:
        """Referenced by more than one sequence, or kept by the image cache."""
        return self.cached or self.holders > 1


@dataclass(eq=False)
class SequenceKV:
    """A sequence's KV: the image prefix it references (or None) and its own block table
    for the positions from `start` on (start = the prefix's length, or 0).  `reserved`
    blocks more were promised to it at admission; it takes them as it grows."""

    prefix: Optional[PooledPrefix]
    start: int
    blocks: list = field(default_factory=list)
    index: Optional[torch.Tensor] = None  # pool indexes of every position its blocks hold
    reserved: int = 0
    closed: bool = False


class PagedKVCache:
    """Keys and values of all sequences and encoded images, in fixed-size blocks of one pool.

    Layout per layer: (kv_heads, n_blocks * block_size + 1, head_dim): block b holds the
    positions b*block_size .. (b+1)*block_size - 1 of that axis, so consecutive blocks are
    one slice.  The extra last position is the discard position: padding writes go there
    and no attention reads it unmasked.  A sequence holds a `SequenceKV` (a block table),
    not a slot; memory follows the positions it uses.  Its dtype is the model's or a
    narrower one (int8 weights: bfloat16, `Engine.kv_dtype`).

    `attention` says how a batch reads it: "split" reads each image's prefix in place,
    once for all the batch's rows on that image, and gathers only the rows' own positions
    (no copy of 730 positions per row: what a CPU wants); "gather" gathers every row's
    positions, prefix included, and runs one fused attention kernel (a GPU's way).  Both
    give the same answers; the tests run both on the CPU."""

    def __init__(self, cfg: ModelConfig, n_blocks: int, block_size: int, context: int, device, dtype,
                 attention: str = "split"):
        if n_blocks < 1 or block_size < 1:
            raise ValueError("a KV pool needs at least one block of at least one position")
        if attention not in ("split", "gather"):
            raise ValueError(f"attention is split or gather, not {attention!r}")
        self.attention = attention
        shape = (cfg.n_kv_heads, n_blocks * block_size + 1, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.block_size = block_size
        self.context = context
        self.device = device
        self.allocator = BlockAllocator(n_blocks)
        self.discard_position = n_blocks * block_size
        self.block_bytes = kv_bytes_per_position(cfg, dtype) * block_size
        self.prefixes: set[PooledPrefix] = set()  # alive in the pool

    # -- accounting
    @property
    def n_blocks(self) -> int:
        return self.allocator.n_blocks

    def bytes(self) -> int:
        return self.n_blocks * self.block_bytes

    def used_bytes(self) -> int:
        return (self.n_blocks - self.allocator.n_free) * self.block_bytes

    def shared_bytes(self) -> int:
        return sum(len(p.blocks) for p in self.prefixes if p.shared()) * self.block_bytes

    def blocks_for(self, positions: int) -> int:
        return blocks_for(positions, self.block_size)

    # -- encoded images
    def store_prefix(self, prefix: "PrefixKV") -> PooledPrefix:
        """Copy an encoded image's KV into blocks of the pool (once; sequences then reference it)."""
        blocks = self.allocator.take_run(self.blocks_for(prefix.length))
        pooled = PooledPrefix(blocks=blocks, length=prefix.length, index=self.physical(blocks, 0, prefix.length))
        if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
            start = blocks[0] * self.block_size
            pooled.run = slice(start, start + prefix.length)
        where = pooled.run if pooled.run is not None else pooled.index
        for layer in range(len(self.k)):
            self.k[layer][:, where] = prefix.k[layer].to(self.k[layer].dtype)
            self.v[layer][:, where] = prefix.v[layer].to(self.v[layer].dtype)
        self.prefixes.add(pooled)
        return pooled

    def hold_prefix(self, prefix: PooledPrefix) -> None:
        prefix.holders += 1

    def drop_prefix(self, prefix: PooledPrefix) -> None:
        prefix.holders -= 1
        if prefix.holders <= 0 and prefix in self.prefixes:
            self.prefixes.discard(prefix)
            self.allocator.give_back(prefix.blocks)

    # -- sequences
    def open_sequence(self, prefix: Optional[PooledPrefix], max_positions: int) -> SequenceKV:
        """A new sequence on `prefix` that may grow to `max_positions` positions in all:
        its own blocks are reserved now (admission checked `allocator.available()`)
        and taken as it grows."""
        start = prefix.length if prefix is not None else 0
        need = self.blocks_for(max(0, max_positions - start))
        if need > self.allocator.available():
            raise PoolExhausted(f"{need} KV blocks wanted, {self.allocator.available()} available")
        if prefix is not None:
            self.hold_prefix(prefix)
        self.allocator.reserved += need
        return SequenceKV(prefix=prefix, start=start, reserved=need)

    def grow(self, seq: SequenceKV, positions: int) -> None:
        """Make sure the sequence's blocks cover positions 0..positions-1."""
        missing = self.blocks_for(positions - seq.start) - len(seq.blocks)
        if missing <= 0:
            return
        from_reserve = min(missing, seq.reserved)
        if missing - from_reserve > self.allocator.available():
            raise PoolExhausted("a sequence outgrew its reserved KV blocks and the pool has no more free")
        new = self.allocator.take(missing)
        seq.blocks += new
        fresh = self.physical(new, 0, missing * self.block_size)
        seq.index = fresh if seq.index is None else torch.cat([seq.index, fresh])
        seq.reserved -= from_reserve
        self.allocator.reserved -= from_reserve

    def close_sequence(self, seq: SequenceKV) -> None:
        if seq.closed:
            return
        seq.closed = True
        self.allocator.give_back(seq.blocks)
        seq.blocks, seq.index = [], None
        self.allocator.reserved -= seq.reserved
        seq.reserved = 0
        if seq.prefix is not None:
            self.drop_prefix(seq.prefix)

    # -- where positions live
    def physical(self, blocks: list, first: int, stop: int) -> torch.Tensor:
        """Pool indexes of a block table's positions first..stop-1 (counted from the table's start)."""
        offsets = torch.arange(first, stop)
        table = torch.tensor(blocks, dtype=torch.long)
        return (table[offsets // self.block_size] * self.block_size + offsets % self.block_size).to(self.device)


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
    cos, sin = rotary_for_heads(cos, sin, cfg.head_dim, x.dtype)  # once, not per layer
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
class LoneRow:
    """A batch row alone on its image (the CPU's split attention): its own positions are
    gathered by themselves, into a buffer small enough to stay in the core's cache, and
    its prefix is read in place.  One big gather of every row's own positions cost ~15%
    more than the slot design's decode step at batch 32: the gathered copy went out to
    memory and was read back; per row it does not."""

    row: int
    prefix: "slice | torch.Tensor"  # the prefix's pool positions
    own: torch.Tensor  # (n,) pool indexes of the row's own positions (no padding)
    bias: Optional[torch.Tensor]  # (1, 1, T, n) additive mask; None: each input sees all n


@dataclass
class SplitPlan:
    """How the CPU's split attention reads a batch: `lone` rows one by one (see LoneRow);
    the `rest` (rows sharing an image with others, rows without an image) gathered
    together in one kernel call, and each image of `shared` read once for all its rows."""

    lone: list  # [LoneRow]
    rest: list  # batch rows, ints
    rest_read: torch.Tensor  # (len(rest), L) their gathered positions (`BatchLayout.read`'s rows)
    rest_bias: Optional[torch.Tensor]  # (len(rest), 1, T, L) additive mask; None: all visible
    shared: list  # [(the prefix's pool positions, its rows as a list of ints)]


@dataclass
class BatchLayout:
    """Where one batched forward writes and reads in the pool (built by `batch_layout`).

    Row r's new keys and values go to `write[r]`.  It attends to the pool positions
    `read[r]` (gathered; padding columns point at the discard position and are masked)
    and, when it is in one of `groups`, to that group's image prefix read in place once
    for all the group's rows; both parts are merged exactly (one softmax over both).
    On the CPU, `split` says the same in the order the CPU kernel wants it."""

    positions: torch.Tensor  # (B, T) the new inputs' positions
    write: torch.Tensor  # (B * T,) pool indexes of their keys and values
    read: torch.Tensor  # (B, L) pool indexes of the positions each row gathers
    mask: Optional[torch.Tensor]  # (B, 1, T, L) which gathered positions each input sees; None: all
    groups: list  # [(the prefix's pool positions: a slice or an index tensor, batch rows tensor)]
    split: Optional[SplitPlan]  # the CPU's plan when prefixes are split, else None
    gather_space: tuple  # two flat buffers that every layer gathers keys and values into (see `_gather`)


def batch_layout(cache: PagedKVCache, seqs: list, start_pos: list, t: int, split_prefixes: bool) -> BatchLayout:
    """Row i feeds positions start_pos[i] .. + t - 1 of sequence seqs[i] (whose blocks
    already cover them).  With `split_prefixes`, the rows on an image read its prefix
    in place, once per image (the CPU's way: no copy of the 730 positions per row);
    without, every row gathers all its positions (the GPU's way: one fused attention)."""
    device = cache.device
    rows, groups, starts = [], {}, []
    for i, (seq, s) in enumerate(zip(seqs, start_pos)):
        own = seq.index
        live_own = s + t - seq.start
        read = own[:live_own]
        first = seq.start
        if seq.prefix is not None:
            if split_prefixes:
                groups.setdefault(id(seq.prefix), (seq.prefix, []))[1].append(i)
            else:
                read = torch.cat([seq.prefix.index, read])
                first = 0
        rows.append((own[s - seq.start:live_own], read))
        starts.append(first)
    b = len(seqs)
    width = max(len(read) for _, read in rows)
    read = torch.full((b, width), cache.discard_position, dtype=torch.long, device=device)
    for i, (_, r) in enumerate(rows):
        read[i, :len(r)] = r
    write = torch.cat([w for w, _ in rows])
    positions = torch.tensor(start_pos, device=device).view(b, 1) + torch.arange(t, device=device).view(1, t)
    columns = torch.tensor(starts, device=device).view(b, 1) + torch.arange(width, device=device).view(1, width)
    full = t == 1 and all(len(r) == width for _, r in rows)  # one new position each, no padding: sees all
    mask = None if full else columns.view(b, 1, 1, width) <= positions.view(b, 1, t, 1)
    where = {key: prefix.run if prefix.run is not None else prefix.index for key, (prefix, _) in groups.items()}
    group_list = [(where[key], torch.tensor(members, device=device)) for key, (_, members) in groups.items()]
    split = None
    if groups and device.type == "cpu":
        bias = None if mask is None else torch.zeros(mask.shape, dtype=cache.k[0].dtype).masked_fill_(~mask, float("-inf"))
        lone = [LoneRow(row=members[0], prefix=where[key], own=rows[members[0]][1],
                        bias=None if t == 1 else bias[members[0]:members[0] + 1, :, :, :len(rows[members[0]][1])])
                for key, (_, members) in groups.items() if len(members) == 1]
        alone = {r.row for r in lone}
        rest = [i for i in range(b) if i not in alone]
        split = SplitPlan(lone=lone, rest=rest, rest_read=read[rest],
                          rest_bias=None if bias is None else bias[rest],
                          shared=[(where[key], members) for key, (_, members) in groups.items() if len(members) > 1])
    # every layer gathers into the same two buffers: a fresh 16 MB tensor per layer (batch 32)
    # came back from the allocator as new pages each time, and faulting them in cost as much
    # as the gather itself
    gather_space = tuple(torch.empty(read.numel() * cache.k[0].shape[0] * cache.k[0].shape[2],
                                     dtype=cache.k[0].dtype, device=device) for _ in range(2))
    return BatchLayout(positions=positions, write=write, read=read, mask=mask, groups=group_list, split=split,
                       gather_space=gather_space)


def _gather(pool: torch.Tensor, read: torch.Tensor, space: torch.Tensor) -> torch.Tensor:
    """The pool's (H, positions, D) entries at `read` (n, L), as (n, H, L, D), copied into `space`.
    (index_select: plain advanced indexing on the pool's middle axis is several times slower on the CPU.)"""
    heads, _, head_dim = pool.shape
    n, width = read.shape
    into = space[:heads * n * width * head_dim].view(heads, n * width, head_dim)
    return torch.index_select(pool, 1, read.view(-1), out=into).view(heads, n, width, head_dim).transpose(0, 1)


def text_forward(embeds: torch.Tensor, layout: BatchLayout, cache: PagedKVCache, w: dict, cfg: ModelConfig, rope,
                 lora: "LoraBatch | None" = None) -> torch.Tensor:
    """B rows, each feeding T new positions (`layout.positions`), attending causally to
    everything at or before each position of its own sequence in the pool, where the
    new keys and values are stored first.  `lora` adds each row's variant adapter
    (see LoraBatch).  Returns hidden (B, T, C) before post_ln."""
    b, t, _ = embeds.shape
    cos = rope[0][layout.positions].unsqueeze(1)  # (B, 1, T, 16)
    sin = rope[1][layout.positions].unsqueeze(1)
    gqa = cfg.n_heads != cfg.n_kv_heads
    heads = cfg.n_kv_heads

    def attend_for_layer(layer):
        k_pool, v_pool = cache.k[layer], cache.v[layer]

        def attend(q, k, v):
            # a pool in a narrower dtype than the model's (int8 weights: bfloat16) is
            # read in its own dtype; with equal dtypes the casts are no-ops
            # index_copy_: plain advanced indexing on the pool's middle axis is many times
            # slower on the CPU (measured: 7.8 ms against 0.014 ms per write)
            k_pool.index_copy_(1, layout.write, _as(k.transpose(0, 1).reshape(heads, b * t, -1), k_pool.dtype))
            v_pool.index_copy_(1, layout.write, _as(v.transpose(0, 1).reshape(heads, b * t, -1), v_pool.dtype))
            q = _as(q, k_pool.dtype)
            if layout.split is not None:
                out = _attention_with_shared_prefixes_cpu(q, k_pool, v_pool, layout.split, layout.gather_space)
                return _as(out, embeds.dtype)
            keys = _gather(k_pool, layout.read, layout.gather_space[0])
            values = _gather(v_pool, layout.read, layout.gather_space[1])
            if not layout.groups:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=layout.mask, enable_gqa=gqa)
            else:
                mask = layout.mask if layout.mask is not None else torch.ones(
                    b, 1, t, keys.shape[2], dtype=torch.bool, device=q.device)
                parts = [(k_pool[:, where], v_pool[:, where], members) for where, members in layout.groups]
                out = _attention_with_shared_prefixes(q, keys, values, mask, parts)
            return _as(out, embeds.dtype)
        return attend

    return _text_blocks(embeds, w, cfg, cos, sin, attend_for_layer, lora, layout.positions)


def _attention_with_shared_prefixes_cpu(q, k_pool, v_pool, plan: SplitPlan, gather_space: tuple):
    """The same as `_attention_with_shared_prefixes`, from PyTorch's CPU flash-attention
    kernel, which also returns each query's log-sum-exp: a row's own positions and its
    image's prefix are separate attentions, merged once for all rows by their
    log-sum-exps (a common maximum).  A plain matmul of one query row against a prefix
    is many times slower on the CPU than this kernel.  The kernel computes each (row,
    head) by itself, so a row's result is the same whichever call it is part of; it
    maps query heads to fewer key heads itself (grouped-query attention)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, h, t, d = q.shape
    out, out_p = torch.empty_like(q), torch.zeros_like(q)
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    lse_p = torch.full_like(lse, float("-inf"))  # rows without a prefix: its weight is 0
    for lone in plan.lone:
        r, q_r = lone.row, q[lone.row:lone.row + 1]
        own_k = _gather(k_pool, lone.own.view(1, -1), gather_space[0])  # the same buffers for every row
        own_v = _gather(v_pool, lone.own.view(1, -1), gather_space[1])
        out[r:r + 1], lse[r:r + 1] = flash(q_r, own_k, own_v, attn_mask=lone.bias)
        out_p[r:r + 1], lse_p[r:r + 1] = flash(q_r, k_pool[:, lone.prefix].unsqueeze(0), v_pool[:, lone.prefix].unsqueeze(0))
    if plan.rest:
        keys = _gather(k_pool, plan.rest_read, gather_space[0])
        values = _gather(v_pool, plan.rest_read, gather_space[1])
        out[plan.rest], lse[plan.rest] = flash(q[plan.rest], keys, values, attn_mask=plan.rest_bias)
    for where, rows in plan.shared:
        # the group's rows side by side as one (1, H, n*T, D) query: one read of the prefix for all of them
        n = len(rows)
        q_g = q[rows].permute(1, 0, 2, 3).reshape(1, h, n * t, d)
        o, l = flash(q_g, k_pool[:, where].unsqueeze(0), v_pool[:, where].unsqueeze(0))
        out_p[rows] = o.view(h, n, t, d).permute(1, 0, 2, 3)
        lse_p[rows] = l.view(h, n, t).permute(1, 0, 2)
    lse, lse_p = lse.unsqueeze(-1), lse_p.unsqueeze(-1)
    top = torch.maximum(lse, lse_p)
    w_own, w_p = torch.exp(lse - top), torch.exp(lse_p - top)
    return ((out.float() * w_own + out_p.float() * w_p) / (w_own + w_p)).to(q.dtype)


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
