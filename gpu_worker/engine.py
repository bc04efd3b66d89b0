"""The loaded model and the batched operations the scheduler calls.

`load_model(config)` returns an `Engine` for MOONDREAM_ENGINE=native (ours) or a
`TransformersEngine` (the official remote code, see transformers_engine.py)."""
from __future__ import annotations

import collections
from typing import Optional, Sequence

import numpy as np
import torch

from gpu_worker import model as M
from gpu_worker.checkpoint import Checkpoint, ModelLoadError, load_checkpoint  # noqa: F401  (re-exported)


class Engine:
    """Weights plus the batched forward passes, on one device."""

    kind = "native"

    def __init__(self, checkpoint: Checkpoint, weight_format: str = "", kv_dtype: Optional[torch.dtype] = None):
        self.config = checkpoint.config
        self.weights = checkpoint.weights
        self.tokenizer = checkpoint.tokenizer
        embedding = self.weights["text.wte"]  # always a plain tensor, in the compute dtype
        self.device, self.dtype = embedding.device, embedding.dtype
        self.kv_dtype = kv_dtype or self.dtype  # the KV cache's and encoded images' keys and values
        self.rope = M.rotary_table(self.config.max_context, self.device, self.config.rope_theta)
        self.info = {
            "name": checkpoint.source,
            "revision": self.config.revision,
            "device": str(self.device),
            "dtype": weight_format or str(self.dtype).replace("torch.", ""),
            "engine": self.kind,
            "test_model": checkpoint.test_model,
        }
        # concatenated adapters of recent batches' variant sets (M.LoraBatch), newest last
        self._adapter_sets: collections.OrderedDict = collections.OrderedDict()

    def create_scheduler(self, max_batch: int = 32, image_cache_bytes: int = 1 << 30, **kwargs):
        from gpu_worker.scheduler import Scheduler

        return Scheduler(self, max_batch=max_batch, image_cache_bytes=image_cache_bytes, **kwargs)

    # -- tokens
    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        return self.weights["text.wte"][torch.tensor(list(ids), device=self.device)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # -- images
    # -- variants
    def lora_batch(self, adapters: Sequence) -> Optional[M.LoraBatch]:
        """Row i's variant adapter (or None for the base model) -> the LoraBatch that
        applies them all in one forward; None when no row has one."""
        distinct = tuple(dict.fromkeys(a for a in adapters if a is not None))
        if not distinct:
            return None
        entry = self._adapter_sets.get(distinct)
        if entry is None:
            entry = M.concat_adapters(distinct)
            self._adapter_sets[distinct] = entry
            if len(self._adapter_sets) > 4:  # holds adapters alive: keep only a few sets
                self._adapter_sets.popitem(last=False)
        else:
            self._adapter_sets.move_to_end(distinct)
        layers, spans = entry
        mask = torch.zeros(len(adapters), 1, spans[-1][1], device=self.device, dtype=self.dtype)
        for row, adapter in enumerate(adapters):
            if adapter is not None:
                start, end = spans[distinct.index(adapter)]
                mask[row, 0, start:end] = 1
        return M.LoraBatch(layers=layers, mask=mask)

    @torch.inference_mode()
    def encode_images(self, images: list, adapters: Optional[Sequence] = None) -> list[M.PrefixKV]:
        """Vision encoder over all crops of all images in one forward, then the
        [BOS, image] prefix prefill of all images in one batch.  adapters[i] is the
        variant image i is encoded for (None: the base model)."""
        crops = [M.crops_to_input(torch.from_numpy(np.ascontiguousarray(im.crops)).to(self.device), self.dtype)
                 for im in images]
        embeddings = M.encode_crops(crops, [tuple(im.tiling) for im in images], self.weights, self.config)
        bos = self.embed_tokens([self.config.tokenizer["bos_id"]])
        prefix = torch.stack([torch.cat([bos, e], dim=0) for e in embeddings])
        lora = self.lora_batch(adapters) if adapters else None
        _, prefixes = M.prefill_prefixes(prefix, self.weights, self.config, self.rope, lora)
        return [M.PrefixKV(k=[t.to(self.kv_dtype).contiguous() for t in p.k],
                           v=[t.to(self.kv_dtype).contiguous() for t in p.v], length=p.length)
                for p in prefixes]

    def image_embeddings(self, images: list) -> list[torch.Tensor]:
        """Only the vision half (for tests and benchmarks)."""
        with torch.inference_mode():
            crops = [M.crops_to_input(torch.from_numpy(np.ascontiguousarray(im.crops)).to(self.device), self.dtype)
                     for im in images]
            return M.encode_crops(crops, [tuple(im.tiling) for im in images], self.weights, self.config)

    # -- text
    def new_cache(self, n_slots: int, context: int | None = None) -> M.KVCache:
        return M.KVCache(self.config, n_slots, context or self.config.max_context, self.device, self.kv_dtype)

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, start_pos: list[int], slots: list[int], cache: M.KVCache,
                prefixes: Optional[list] = None, adapters: Optional[list] = None) -> torch.Tensor:
        """(B, T, C) new inputs, sequence i at positions start_pos[i].. of slot slots[i]
        -> (B, C) raw hidden state of each sequence's last position.

        prefixes[i] is row i's image PrefixKV (also copied in its slot) or None; rows
        of the batch on the same image read it once together (SharedPrefixPlan).
        adapters[i] is row i's variant adapter or None (LoraBatch).

        When the slots are nearly consecutive the batch is laid out over the slot range
        lo..hi, padding rows for the missing slots, so attention reads the cache in
        place instead of gathering every sequence's keys (the gather cost more than
        the attention itself)."""
        b, t, _ = embeds.shape
        lo, hi = min(slots), max(slots) + 1
        live = max(start_pos) + t
        offsets = torch.arange(t, device=self.device).view(1, t)
        if hi - lo <= 2 * b + 1:  # dense: row r is slot lo + r (padding rows cost less than a gather)
            n = hi - lo
            row_of = [s - lo for s in slots]
            index = torch.tensor(row_of, device=self.device)
            full = embeds.new_zeros(n, t, embeds.shape[-1])
            full[index] = embeds
            embeds = full
            starts = torch.zeros(n, dtype=torch.long, device=self.device)
            starts[index] = torch.tensor(start_pos, device=self.device)
            positions = starts.view(n, 1) + offsets
            write = torch.full((n, t), cache.discard_position, dtype=torch.long, device=self.device)
            write[index] = positions[index]
            rows = slice(lo, hi)
        else:
            row_of = list(range(b))
            positions = write = torch.tensor(start_pos, device=self.device).view(b, 1) + offsets
            rows = torch.tensor(slots, device=self.device)
        plan = self._shared_prefix_plan(prefixes or [None] * b, row_of, slots, start_pos, t)
        lora = None
        if adapters and any(a is not None for a in adapters):
            per_row = [None] * embeds.shape[0]  # padding rows of the dense layout get none
            for i, adapter in enumerate(adapters):
                per_row[row_of[i]] = adapter
            lora = self.lora_batch(per_row)
        hidden = M.text_forward(embeds, positions, write, rows, live, cache, self.weights, self.config,
                                self.rope, plan, lora)
        return hidden[torch.tensor(row_of, device=self.device), -1]

    def _shared_prefix_plan(self, prefixes, row_of, slots, start_pos, t) -> Optional[M.SharedPrefixPlan]:
        by_image: dict[int, list[int]] = {}
        for i, prefix in enumerate(prefixes):
            if prefix is not None:
                by_image.setdefault(id(prefix), []).append(i)
        shared = [i for members in by_image.values() if len(members) > 1 for i in members]
        if not shared:
            return None
        private = [i for i in range(len(slots)) if i not in set(shared)]
        position_in_shared = {i: j for j, i in enumerate(shared)}
        groups = [(prefixes[members[0]], torch.tensor([position_in_shared[i] for i in members], device=self.device))
                  for members in by_image.values() if len(members) > 1]

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        return M.SharedPrefixPlan(
            private_rows=tensor([row_of[i] for i in private]), private_slots=tensor([slots[i] for i in private]),
            private_live=max([start_pos[i] + t for i in private], default=0),
            shared_rows=tensor([row_of[i] for i in shared]), shared_slots=tensor([slots[i] for i in shared]),
            shared_live=max(start_pos[i] + t for i in shared), groups=groups)

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        return M.lm_logits(hidden_last, self.weights)

    # -- region heads
    def encode_coordinates(self, values: Sequence[float]) -> torch.Tensor:
        return M.encode_coordinates(torch.tensor(list(values), device=self.device, dtype=self.dtype), self.weights)

    def encode_sizes(self, sizes: Sequence[Sequence[float]]) -> torch.Tensor:
        return M.encode_sizes(torch.tensor(sizes, device=self.device, dtype=self.dtype), self.weights)

    def decode_coordinates(self, hidden: torch.Tensor) -> list[float]:
        bins = M.decode_coordinate_bins(hidden, self.weights)
        return [b / self.config.coord_out_dim for b in bins.tolist()]

    def decode_sizes(self, hidden: torch.Tensor) -> list[tuple[float, float]]:
        bins = M.decode_size_bins(hidden, self.weights)
        return [(M.size_from_bin(w), M.size_from_bin(h)) for w, h in bins.tolist()]


def load_model(config) -> Engine:
    """Build the engine the config asks for.  Raises ModelLoadError (one line)."""
    if config.engine == "transformers":
        from gpu_worker.transformers_engine import TransformersEngine

        return TransformersEngine.load(config)
    if config.engine != "native":
        raise ModelLoadError(f"MOONDREAM_ENGINE={config.engine} is not one of native, transformers")
    if config.dtype == "int8":
        return _load_int8(config)
    return Engine(load_checkpoint(config.model, config.revision, config.device, config.dtype, config.hf_token))


def _load_int8(config) -> Engine:
    """MOONDREAM_DTYPE=int8: load in float32 on the CPU, then convert the big linears
    once (gpu_worker/quantize.py); keys and values are kept in INT8_KV_DTYPE."""
    from gpu_worker.checkpoint import resolve_device
    from gpu_worker.quantize import INT8_KV_DTYPE, Int8Converter, _give_memory_back

    if config.device.startswith("cuda") or resolve_device(config.device).type != "cpu":
        raise ModelLoadError("MOONDREAM_DTYPE=int8 runs on the CPU (PyTorch's fbgemm kernels); "
                             "on a GPU use bfloat16, or set MOONDREAM_DEVICE=cpu")
    try:  # converted tensor by tensor as they load: the float32 model is never whole in memory
        checkpoint = load_checkpoint(config.model, config.revision, "cpu", "float32", config.hf_token,
                                     convert=Int8Converter)
    except RuntimeError as err:
        if isinstance(err, ModelLoadError):
            raise
        raise ModelLoadError(f"MOONDREAM_DTYPE=int8: {err}") from None
    _give_memory_back()
    return Engine(checkpoint, weight_format="int8", kv_dtype=INT8_KV_DTYPE)
