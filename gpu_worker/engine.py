"""The loaded model and the batched operations the scheduler calls.

`load_model(config)` returns an `Engine` for MOONDREAM_ENGINE=native (ours) or a
`TransformersEngine` (the official remote code, see transformers_engine.py)."""
from __future__ import annotations

import collections
import os
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
        self.compiled = None  # CompiledDecode when COMPILE is on (use_compiled_decode)

    def use_compiled_decode(self, fault=None) -> None:
        """Decode steps (one position per row) through the compiled graph (compiled_step.py)."""
        from gpu_worker.compiled_step import CompiledDecode

        self.compiled = CompiledDecode(self, fault=fault)

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
    def new_cache(self, n_blocks: int, block_size: int = M.DEFAULT_BLOCK_SIZE, context: int | None = None,
                  attention: str | None = None) -> M.PagedKVCache:
        """A KV pool of `n_blocks` blocks of `block_size` positions (docs/model.md, "KV blocks").
        `attention`: how batches read it, "split" or "gather" (see PagedKVCache); default:
        "gather" on CUDA, "split" elsewhere."""
        attention = attention or ("gather" if self.device.type == "cuda" else "split")
        return M.PagedKVCache(self.config, n_blocks, block_size, context or self.config.max_context,
                              self.device, self.kv_dtype, attention)

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, start_pos: list[int], seqs: list, cache: M.PagedKVCache,
                adapters: Optional[list] = None) -> torch.Tensor:
        """(B, T, C) new inputs, sequence i (a `SequenceKV` of `cache`) at positions
        start_pos[i].. -> (B, C) raw hidden state of each sequence's last position.

        Each sequence takes the blocks these positions need (from what admission reserved
        for it).  Rows on one image read its prefix blocks once together (the "split"
        attention, see PagedKVCache).  adapters[i] is row i's variant adapter or None (LoraBatch)."""
        b, t, _ = embeds.shape
        for seq, start in zip(seqs, start_pos):
            cache.grow(seq, start + t)
        layout = M.batch_layout(cache, seqs, start_pos, t, split_prefixes=cache.attention == "split")
        lora = self.lora_batch(adapters) if adapters and any(a is not None for a in adapters) else None
        hidden = self.compiled(embeds, layout, cache, lora) if self.compiled is not None else None
        if hidden is None:  # not compiled, or a batch the compiled step does not take
            hidden = M.text_forward(embeds, layout, cache, self.weights, self.config, self.rope, lora)
        return hidden[:, -1]

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
        engine = _load_int8(config)
    else:
        engine = Engine(load_checkpoint(config.model, config.revision, config.device, config.dtype, config.hf_token))
    _set_up_compile(engine, config)
    return engine


def _set_up_compile(engine: Engine, config) -> None:
    """COMPILE: decode steps through the compiled graph, compiled lazily on the first one."""
    from gpu_worker.compiled_step import compile_wanted, use_cache_dir

    if not compile_wanted(getattr(config, "compile", "off"), engine.device):
        return
    run_dir = os.environ.get("RUN_DIR", "")
    use_cache_dir(config.inductor_cache_dir or (os.path.join(run_dir, "inductor-cache") if run_dir else ""))
    engine.use_compiled_decode()


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
