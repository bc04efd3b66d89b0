"""Continuous batching over the engine.

Each request becomes a `Sequence`: a block table in the KV pool plus its skill's
program (programs.py).  One `step()`:
  1. admits waiting requests while rows (BATCH_SIZE) and KV blocks last: a request
     starts when the blocks for its prefix + prompt + max_tokens fit (they are
     reserved, and taken as it grows); images not in the image cache are encoded
     together (one vision forward, one prefix prefill) into pool blocks, which every
     sequence on the image then references (never copies);
  2. runs every running sequence's pending feed: all single-position feeds
     (decode steps) as one batch, longer feeds (prompt prefills) batched by length;
  3. samples / decodes what each feed asked for, in one batch, with one host sync;
  4. resumes each program, which yields its next feed or finishes.
Requests join and leave at every step; nothing in a sequence's arithmetic
depends on the others in its batch.

Batch lines (priority BACKGROUND) yield to interactive requests, by the policy the
broker shares (shared/priority.py): they wait behind
them, never take the last `reserved_slots` rows, start their image encodes only
in steps where no interactive request starts (one image per step while
interactive sequences decode), and, with `batch_yield_s` > 0, decode at most one
step per `batch_yield_s` while interactive sequences run (on a CPU, where every
row costs step time), so a bulk job costs interactive users little.
"""
from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch

from gpu_worker import programs as P
from gpu_worker.engine_types import EngineRequest, Failed, Finished, TextChunk
from gpu_worker.model import DEFAULT_BLOCK_SIZE, PagedKVCache, PooledPrefix, SequenceKV, kv_bytes_per_position
from gpu_worker.variants import Adapter, VariantError, VariantNotFound, VariantsUnsupported
from shared.priority import background_slots, enqueue, is_background
from shared.protocol import INTERACTIVE, SamplingSettings, check_params_match


class PromptTooLong(ValueError):
    """The request's prompt does not fit in the context: the client's fault (422)."""


class ImageCache:
    """Encoded image prefixes by pixel hash, least recently used first out, bounded in bytes.

    The prefixes live in the KV pool's blocks; the cache holds a reference to each (the
    pool frees an image's blocks once neither the cache nor any sequence holds it)."""

    def __init__(self, max_bytes: int, pool: PagedKVCache):
        self.max_bytes = max_bytes
        self.pool = pool
        self.entries: collections.OrderedDict[str, PooledPrefix] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0

    def _size(self, prefix: PooledPrefix) -> int:
        return len(prefix.blocks) * self.pool.block_bytes

    def get(self, key: str) -> Optional[PooledPrefix]:
        prefix = self.entries.get(key) if key else None
        if prefix is not None:
            self.entries.move_to_end(key)
        return prefix

    def put(self, key: str, prefix: PooledPrefix) -> None:
        if not key or key in self.entries:
            return
        size = self._size(prefix)
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            self._evict(next(iter(self.entries)))
        self.entries[key] = prefix
        self.bytes += size
        prefix.cached = True
        self.pool.hold_prefix(prefix)

    def _evict(self, key: str) -> None:
        prefix = self.entries.pop(key)
        self.bytes -= self._size(prefix)
        prefix.cached = False
        self.pool.drop_prefix(prefix)

    def free_blocks(self, wanted: int, keep: set) -> int:
        """Evict unused images (no sequence holds them), least recently used first, until
        `wanted` blocks went back to the pool; `keep` names keys not to touch.  Returns
        the blocks freed."""
        freed = 0
        for key in [k for k, p in self.entries.items() if p.holders == 1 and k not in keep]:
            if freed >= wanted:
                break
            freed += len(self.entries[key].blocks)
            self._evict(key)
        return freed


@dataclass
class Sequence:
    request: EngineRequest
    kv: SequenceKV  # its block table (and the image prefix it references) in the pool
    ctx: P.ProgramContext
    program: P.Program
    feed: Optional[P.Feed] = None
    settings: SamplingSettings = P.DEFAULT_SETTINGS  # the request's, every field filled
    generator: Optional[torch.Generator] = None
    input_tokens: int = 0
    image_cache_hit: bool = False
    released: bool = False
    adapter: Optional[Adapter] = None  # its variant's adapter, held for its whole life (eviction cannot touch it)
    t_added: float = 0.0
    t_started: float = 0.0
    t_first_output: float = 0.0
    t_prefill_done: float = 0.0


class Scheduler:
    def __init__(self, engine, max_batch: int = 32, image_cache_bytes: int = 1 << 30,
                 max_images_per_step: int = 8, context: Optional[int] = None,
                 max_encode_crops: int = 40, variants=None, reserved_slots: Optional[int] = None,
                 batch_yield_s: float = 0.0, kv_cache_bytes: Optional[int] = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, attention: Optional[str] = None):
        self.engine = engine
        self.variants = variants  # gpu_worker.variants.VariantStore, or None: base model only
        self.max_batch = max_batch  # rows decoding together; the KV pool bounds them too
        context = context or engine.config.max_context
        n_blocks = kv_pool_blocks(engine, max_batch, context, block_size, kv_cache_bytes)
        self.cache = engine.new_cache(n_blocks, block_size, context, attention)
        self.waiting: collections.deque[tuple[EngineRequest, float]] = collections.deque()
        self.awaiting_variant: dict[str, list[tuple[EngineRequest, float]]] = {}  # variants loading or downloading (off this thread)
        self.running: dict[str, Sequence] = {}
        self.images = ImageCache(image_cache_bytes, self.cache)
        self.waiting_for_blocks = 0  # queued requests held back by a lack of free KV blocks (not of rows)
        self.running_peak = 0  # most sequences running at once, and most pool bytes in use, since start
        self.kv_used_peak = 0
        self.max_images_per_step = max_images_per_step
        self.max_encode_crops = max_encode_crops
        # Rows batch lines may never take: an interactive request always finds one free.
        self.reserved_slots = self.max_batch - background_slots(self.max_batch) if reserved_slots is None else reserved_slots
        self.batch_yield_s = batch_yield_s
        self.batch_last_step = 0.0  # perf_counter of the last step batch lines took part in
        self.events: list = []
        self.counters = collections.Counter()
        self.recorder: Optional[Recorder] = None  # tests: logits and feeds of chosen requests

    # ------------------------------------------------------------------ public API
    def add(self, req: EngineRequest) -> None:
        """Queue a request.  Raises ValueError when its parameters are invalid
        (a VariantError, with its own status, for a variant it cannot serve)."""
        self._validate(req)
        entry = (req, time.perf_counter())
        if req.variant is not None and self._variant_status(req.variant) != "ready":  # loading or fetching
            self.awaiting_variant.setdefault(req.variant, []).append(entry)
            return
        self._enqueue(entry)

    def _enqueue(self, entry: tuple[EngineRequest, float]) -> None:
        """Queue by the shared priority policy (shared/priority.py): batch lines at the tail."""
        enqueue(self.waiting, entry, entry[0].priority, lambda waiting: waiting[0].priority)

    def abort(self, request_id: str) -> None:
        for i, (req, _) in enumerate(self.waiting):
            if req.request_id == request_id:
                del self.waiting[i]
                return
        for entries in self.awaiting_variant.values():
            entries[:] = [e for e in entries if e[0].request_id != request_id]
        seq = self.running.pop(request_id, None)
        if seq is not None:
            seq.program.close()
            self._release(seq)
            self.counters["aborted"] += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or any(self.awaiting_variant.values()))

    def free_rows(self) -> int:
        return self.max_batch - len(self.running)

    def free_slots(self) -> int:
        """Requests this worker would start now: free rows less those already queued (never
        below 0: a queue longer than the free rows is no debt the broker could act on)."""
        return max(0, self.free_rows() - len(self.waiting))

    def stats(self) -> dict:
        pool = self.cache
        return {
            "running": len(self.running), "waiting": len(self.waiting), "free_slots": self.free_rows(),
            "waiting_for_blocks": self.waiting_for_blocks, "running_peak": self.running_peak,
            "kv_bytes_used_peak": self.kv_used_peak,
            "kv_bytes_total": pool.bytes(), "kv_bytes_used": pool.used_bytes(), "kv_bytes_shared": pool.shared_bytes(),
            "kv_blocks_total": pool.n_blocks, "kv_blocks_free": pool.allocator.n_free,
            "image_cache_entries": len(self.images.entries), "image_cache_bytes": self.images.bytes,
            "image_cache_hits": self.images.hits, "image_encodes": self.counters["image_encodes"],
            "steps": self.counters["steps"], "last_batch": self.counters["last_batch"],
            **(self.variants.stats() if self.variants is not None else {}),
        }

    def loaded_variants(self) -> list[str]:
        return list(self.variants.loaded) if self.variants is not None else []

    def step(self) -> list:
        """One iteration; returns the TextChunk / Finished / Failed events it produced."""
        self.events = []
        self._collect_downloads()
        self._admit()
        self.running_peak = max(self.running_peak, len(self.running))
        self.kv_used_peak = max(self.kv_used_peak, self.cache.used_bytes())
        if self.running:
            self._run_feeds()
        self.counters["steps"] += 1
        return self.events

    # ------------------------------------------------------------------ admission
    def _validate(self, req: EngineRequest) -> None:
        """Check what only this model can judge and fill in the settings (model defaults for
        those left out); the values' shapes and ranges were checked at the edge (api/schemas.py).
        Raises ValueError with a message for the client (422)."""
        s = req.settings.filled(P.default_settings(self.engine.config))
        if req.variant is not None and self.engine.config.is_moondream3:
            raise VariantsUnsupported(f"variants are not supported for {self.engine.config.revision}: "
                                      "no Moondream 3 adapter format is pinned yet; ask the base model")
        check_skill = _SKILL_CHECKS.get(req.skill)
        if check_skill is None:
            raise ValueError(f"unknown skill {req.skill!r}")
        check_params_match(req.skill, req.params)  # as a decoded Generate is (a hand-built request too)
        if req.image is None and req.skill != "query":
            raise ValueError(f"{req.skill} needs an image")
        check_skill(req, self.engine.config)
        if self.engine.config.is_moondream3:
            self._check_context(req, s)
        req.settings = s
        self._check_fits(req)

    def _check_fits(self, req: EngineRequest) -> None:
        """Refuse, before any work, a request that could never run: a prompt longer than
        the context, or more KV blocks than the whole pool holds.  Sets req.kv_positions,
        what admission reserves for it."""
        cfg, pool = self.engine.config, self.cache
        prefix = cfg.prefix_attn if req.image is not None else 0
        prompt = P.prompt_length(self.engine, req.skill, req.params, req.image is not None)
        if prefix + prompt > pool.context:
            raise PromptTooLong(f"the prompt needs {prefix + prompt} positions; the model's context holds {pool.context}")
        req.kv_positions = min(pool.context, prefix + prompt + P.generated_positions(cfg, req.skill, req.params, req.settings))
        need = pool.blocks_for(prefix) + pool.blocks_for(req.kv_positions - prefix)
        if need > pool.n_blocks:
            raise ValueError(f"this request may need {need * pool.block_size} KV positions (image, prompt and "
                             f"max_tokens or max_objects); the KV cache (KV_CACHE_GB) holds "
                             f"{pool.n_blocks * pool.block_size}: ask for fewer tokens")

    def _check_context(self, req: EngineRequest, settings: SamplingSettings) -> None:
        """Moondream 3: the prompt plus max_tokens must fit in the context (4,096 positions),
        checked before any work; its reference does not check and fails past the end."""
        needed = P.prompt_length(self.engine, req.skill, req.params, req.image is not None)
        if req.image is not None:
            needed += self.engine.config.prefix_attn
        if req.skill in ("caption", "query"):
            needed += settings.max_tokens
        if needed > self.cache.context:
            raise PromptTooLong(f"the prompt and max_tokens need {needed} positions; "
                                f"the model's context holds {self.cache.context}")

    # ------------------------------------------------------------------ variants
    def _variant_status(self, variant: str) -> str:
        if self.variants is None:
            raise VariantNotFound(f"variant {variant} is not available: this server serves the base model only")
        return self.variants.status(variant)

    def _collect_downloads(self) -> None:
        """Requests whose variant finished loading (or downloading, then loading) join the
        queue, or fail with its error."""
        if self.variants is None or not self.awaiting_variant:
            return
        for variant, err in self.variants.poll_pending():
            for req, t_added in self.awaiting_variant.pop(variant, []):
                if err is None:
                    self._enqueue((req, t_added))
                else:
                    self.events.append(Failed(req.request_id, str(err), err.status, err.code))

    def _adapter_for(self, req: EngineRequest) -> Optional[Adapter]:
        """The variant's adapter: loaded off this thread before the request was queued."""
        return self.variants.get(req.variant) if req.variant is not None else None

    @staticmethod
    def _image_cache_key(req: EngineRequest) -> str:
        """An encoded prefix belongs to one variant: its adapters act in the prefix prefill."""
        if req.image is None or not req.image.key:
            return ""
        return f"{req.variant}|{req.image.key}" if req.variant else req.image.key

    def _admit(self) -> None:
        """Start waiting requests, in queue order, while rows and KV blocks last: a request
        needs the blocks for its image prefix (unless the image is in the pool already)
        plus its own prompt + max_tokens; unused cached images are evicted to make room.
        The head of the queue waits for blocks rather than being overtaken.  While others
        are decoding, only `max_encode_crops` crops of new images are encoded per step, so
        a burst of large images delays the running streams by one bounded step, not by all
        of it.  Batch lines come last (the queue keeps them at its tail) and yield, see
        the module's doc."""
        batch: list[tuple[EngineRequest, float]] = []
        crops_budget = self.max_encode_crops if self.running else None
        new_keys: set[str] = set()
        used_keys: set[str] = set()  # cached images this batch will reference: not to be evicted for it
        interactive_running = any(not is_background(s.request.priority) for s in self.running.values())
        background_encodes = 0
        free_rows = self.free_rows()
        blocks = self.cache.allocator.available()
        self.waiting_for_blocks = 0
        while self.waiting and len(batch) < free_rows:
            req = self.waiting[0][0]
            key = self._image_cache_key(req)
            needs_encode = req.image is not None and key not in new_keys and self.images.get(key) is None
            if is_background(req.priority):
                if free_rows - len(batch) <= self.reserved_slots:
                    break  # the last rows stay free for interactive requests
                if needs_encode:
                    starting_interactive = any(not is_background(r.priority) for r, _ in batch)
                    if starting_interactive or (interactive_running and background_encodes >= 1):
                        break  # its encode would stall the interactive ones: a later step
                    background_encodes += 1
            if needs_encode and crops_budget is not None:
                if batch and crops_budget < len(req.image.crops):
                    break
            need = self._blocks_needed(req, needs_encode)
            if need > blocks:
                blocks += self.images.free_blocks(need - blocks, keep=used_keys)
                if need > blocks:
                    self.waiting_for_blocks = len(self.waiting)
                    break  # it waits for running sequences to give blocks back
            blocks -= need
            if needs_encode and crops_budget is not None:
                crops_budget -= len(req.image.crops)
            if needs_encode and key:
                new_keys.add(key)
            elif key:
                used_keys.add(key)
            batch.append(self.waiting.popleft())
        if not batch:
            return
        adapters = {}
        for req, t_added in list(batch):
            try:
                adapters[req.request_id] = self._adapter_for(req)
            except VariantError as err:  # a bad file fails its own requests only
                self.events.append(Failed(req.request_id, str(err), err.status, err.code))
                batch.remove((req, t_added))
        prefixes, cache_hits = self._prefixes_for([req for req, _ in batch], adapters)
        for req, t_added in batch:
            prefix = prefixes.get(req.request_id)
            if isinstance(prefix, Exception):
                self._fail(req.request_id, f"image encoding failed: {prefix}")
                continue
            try:
                self._start(req, prefix, t_added, req.request_id in cache_hits, adapters[req.request_id])
            except Exception as err:  # a broken request must not take the batch down
                self._fail(req.request_id, f"could not start: {err}")
        for prefix in set(p for p in prefixes.values() if isinstance(p, PooledPrefix)):
            self.cache.drop_prefix(prefix)  # _prefixes_for's hold; one neither cached nor started goes back

    def _blocks_needed(self, req: EngineRequest, needs_encode: bool) -> int:
        """KV blocks a request takes at most: its own positions, and its image's if encoded now."""
        prefix = self.engine.config.prefix_attn if req.image is not None else 0
        own = self.cache.blocks_for(req.kv_positions - prefix)
        return own + (self.cache.blocks_for(prefix) if needs_encode else 0)

    def _prefixes_for(self, requests: list[EngineRequest], adapters: dict) -> tuple[dict, set]:
        """Prefix per request id, from the image cache or encoded now (several images per
        forward, each under its request's variant), and the ids that were cache hits.
        Each distinct prefix returned is held once more, for the caller to drop."""
        out, hits, to_encode = {}, set(), collections.OrderedDict()
        for req in requests:
            if req.image is None:
                continue
            key = self._image_cache_key(req)
            cached = self.images.get(key)
            if cached is not None:
                if not any(p is cached for p in out.values()):
                    self.cache.hold_prefix(cached)  # the cache may evict it while this step encodes others
                self.images.hits += 1
                hits.add(req.request_id)
                out[req.request_id] = cached
            else:
                to_encode.setdefault(key or req.request_id, []).append(req)
        groups = list(to_encode.items())
        for start in range(0, len(groups), self.max_images_per_step):
            chunk = groups[start:start + self.max_images_per_step]
            try:
                encoded = self.engine.encode_images([reqs[0].image for _, reqs in chunk],
                                                    [adapters.get(reqs[0].request_id) for _, reqs in chunk])
            except Exception as err:
                encoded = [err] * len(chunk)
            for (key, reqs), prefix in zip(chunk, encoded):
                if not isinstance(prefix, Exception):
                    self.counters["image_encodes"] += 1
                    prefix = self.cache.store_prefix(prefix)  # into pool blocks; sequences reference it
                    self.cache.hold_prefix(prefix)  # until its requests started (_admit)
                    self.images.put(self._image_cache_key(reqs[0]), prefix)
                for req in reqs:
                    out[req.request_id] = prefix
        return out, hits

    def _start(self, req: EngineRequest, prefix: Optional[PooledPrefix], t_added: float, cache_hit: bool,
               adapter: Optional[Adapter] = None) -> None:
        kv = self.cache.open_sequence(prefix, req.kv_positions)
        try:
            seq = self._new_sequence(req, kv, t_added, cache_hit, adapter)
        except BaseException:
            self.cache.close_sequence(kv)  # not registered yet: nobody else would give the blocks back
            raise
        self.running[req.request_id] = seq
        self._advance(seq, None)
        if seq.feed is not None:
            seq.input_tokens = seq.feed.length  # the prompt

    def _new_sequence(self, req: EngineRequest, kv: SequenceKV, t_added: float,
                      cache_hit: bool, adapter: Optional[Adapter]) -> Sequence:
        ctx = P.ProgramContext(engine=self.engine, emit=lambda text, rid=req.request_id: self._emit(rid, text),
                               context=self.cache.context, position=kv.start, stream=req.stream)
        program = P.start_program(ctx, req.skill, req.params, req.settings, req.image is not None)
        seq = Sequence(request=req, kv=kv, ctx=ctx, program=program, settings=req.settings,
                       t_added=t_added, t_started=time.perf_counter(), image_cache_hit=cache_hit, adapter=adapter)
        seq.generator = torch.Generator(device="cpu")
        seq.generator.manual_seed(req.seed if req.seed is not None else random.getrandbits(63))
        return seq

    # ------------------------------------------------------------------ running
    def _stepping(self) -> list[Sequence]:
        """The sequences that run this step: all, except that while interactive ones run,
        batch lines take a step only once per `batch_yield_s` (never stalled, only slowed)."""
        seqs = list(self.running.values())
        if self.batch_yield_s <= 0:
            return seqs
        now = time.perf_counter()
        interactive = [s for s in seqs if s.request.priority >= INTERACTIVE]
        if interactive and len(interactive) < len(seqs) and now - self.batch_last_step < self.batch_yield_s:
            return interactive
        self.batch_last_step = now
        return seqs

    def _run_feeds(self) -> None:
        groups: dict[int, list[Sequence]] = collections.defaultdict(list)
        for seq in self._stepping():
            groups[seq.feed.length].append(seq)
        results: list[tuple[Sequence, P.StepResult]] = []
        for length, seqs in groups.items():
            try:
                results += self._run_group(rows_by_image(seqs), length)
            except Exception as err:
                for seq in seqs:
                    self._finish_failed(seq, f"generation failed: {err}")
        for seq, result in results:
            if seq.request.request_id in self.running:
                self._advance(seq, result)

    def _run_group(self, seqs: list[Sequence], length: int) -> list[tuple[Sequence, P.StepResult]]:
        engine = self.engine
        if all(s.feed.tokens is not None for s in seqs):
            embeds = engine.embed_tokens([t for s in seqs for t in s.feed.tokens]).view(len(seqs), length, -1)
        else:
            embeds = torch.stack([s.feed.embeds if s.feed.embeds is not None else engine.embed_tokens(s.feed.tokens)
                                  for s in seqs])
        hidden = engine.forward(embeds, [s.ctx.position for s in seqs], [s.kv for s in seqs], self.cache,
                                [s.adapter for s in seqs])
        self.counters["last_batch"] = len(seqs)
        results = [P.StepResult() for _ in seqs]
        self._sample(seqs, hidden, results)
        self._decode_regions(seqs, hidden, results)
        for s in seqs:
            s.ctx.position += length
            if length > 1 and not s.t_prefill_done:
                s.t_prefill_done = time.perf_counter()
        return list(zip(seqs, results))

    def _sample(self, seqs, hidden, results) -> None:
        """Next tokens for every row that asked, as whole-batch tensor operations and
        one host transfer: greedy rows by argmax, the others by their own temperature
        and top-p, each drawing from its own seeded generator."""
        rows = [i for i, s in enumerate(seqs) if s.feed.sample is not None]
        if not rows:
            return
        specs = [seqs[i].feed.sample for i in rows]
        with torch.inference_mode():
            logits = self.engine.logits(hidden if len(rows) == len(seqs) else hidden[rows]).float()
            if self.recorder is not None:
                self.recorder.logits([seqs[i].request.request_id for i in rows], logits)
            suppressed = {spec.suppress for spec in specs}
            if len(suppressed) == 1:  # the usual step: every row bans the same ids (or none): one op
                ids = next(iter(suppressed))
                if ids:
                    logits[:, list(ids)] = float("-inf")
            else:
                banned = [(j, t) for j, spec in enumerate(specs) for t in spec.suppress]
                logits[[j for j, _ in banned], [t for _, t in banned]] = float("-inf")
            next_tokens = logits.argmax(dim=-1)
            for j, spec in enumerate(specs):
                if spec.choices:  # a greedy pick among a few ids (Moondream 3's coord-or-EOS)
                    allowed = torch.tensor(spec.choices, device=logits.device)
                    next_tokens[j] = allowed[logits[j, allowed].argmax()]
            sampled = [j for j, spec in enumerate(specs) if spec.temperature > 0]
            if sampled:
                device = logits.device
                temps = torch.tensor([specs[j].temperature for j in sampled], device=device).view(-1, 1)
                top_p = torch.tensor([specs[j].top_p for j in sampled], device=device).view(-1, 1)
                probs = top_p_filter(torch.softmax(logits[sampled] / temps, dim=-1), top_p)
                draws = torch.stack([torch.rand((), generator=seqs[rows[j]].generator) for j in sampled]).to(device)
                cdf = probs.cumsum(dim=-1)
                picked = torch.searchsorted(cdf, (draws * cdf[:, -1]).view(-1, 1)).view(-1)
                next_tokens[sampled] = picked.clamp_(max=probs.shape[-1] - 1)
            tokens = next_tokens.tolist()
        for j, i in enumerate(rows):
            results[i].token = tokens[j]

    def _decode_regions(self, seqs, hidden, results) -> None:
        with torch.inference_mode():
            rows = [i for i, s in enumerate(seqs) if s.feed.coord]
            if rows:
                for i, value in zip(rows, self.engine.decode_coordinates(hidden[rows])):
                    results[i].coord = value
            rows = [i for i, s in enumerate(seqs) if s.feed.size]
            if rows:
                for i, value in zip(rows, self.engine.decode_sizes(hidden[rows])):
                    results[i].size = value

    def _advance(self, seq: Sequence, result: Optional[P.StepResult]) -> None:
        """Resume the program with its step result; it yields its next feed or finishes."""
        try:
            seq.feed = seq.program.send(result)
            if not seq.t_first_output and not seq.ctx.stream and seq.ctx.output_tokens:  # no chunk marks it
                seq.t_first_output = time.perf_counter()
            if self.recorder is not None:
                self.recorder.feed(seq.request.request_id, seq.feed)
            if seq.ctx.position + seq.feed.length > self.cache.context:
                raise PromptTooLong(f"the prompt needs {seq.ctx.position + seq.feed.length} positions; "
                                    f"the model's context holds {self.cache.context}")
        except StopIteration as stop:
            output, finish = stop.value
            self._finish_ok(seq, output, finish)
        except PromptTooLong as err:
            self._finish_failed(seq, str(err), status=422)
        except Exception as err:
            self._finish_failed(seq, f"{type(err).__name__}: {err}")

    def _emit(self, request_id: str, text: str) -> None:
        seq = self.running.get(request_id)
        if seq is not None and not seq.t_first_output:
            seq.t_first_output = time.perf_counter()
        self.events.append(TextChunk(request_id, text))

    def _finish_ok(self, seq: Sequence, output: dict, finish: Optional[str]) -> None:
        now = time.perf_counter()
        prefill_done = seq.t_prefill_done or now
        first = seq.t_first_output or now
        image_positions = self.engine.config.prefix_attn if seq.request.image is not None else 0
        metrics = {
            "input_tokens": image_positions + seq.input_tokens,
            "output_tokens": seq.ctx.output_tokens,
            "prefill_time_ms": round((prefill_done - seq.t_started) * 1000, 3),
            "decode_time_ms": round((now - prefill_done) * 1000, 3),
            "ttft_ms": round((first - seq.t_added) * 1000, 3),
            "queue_time_ms": round((seq.t_started - seq.t_added) * 1000, 3),
            "image_cache_hit": seq.image_cache_hit,
        }
        self.running.pop(seq.request.request_id, None)
        self._release(seq)
        self.events.append(Finished(seq.request.request_id, output, finish, metrics))

    def _finish_failed(self, seq: Sequence, message: str, status: int = 500) -> None:
        self.running.pop(seq.request.request_id, None)
        self._release(seq)
        self.events.append(Failed(seq.request.request_id, message, status))

    def _fail(self, request_id: str, message: str) -> None:
        self.events.append(Failed(request_id, message))

    def _release(self, seq: Sequence) -> None:
        if seq.released:
            return
        seq.released = True
        seq.adapter = None
        self.cache.close_sequence(seq.kv)


# ---------------------------------------------------------------------- per-skill rules
def _check_query(req: EngineRequest, cfg) -> None:
    if req.params.reasoning and not cfg.reasoning_supported:  # None: the model's default
        raise ValueError(f"reasoning is not supported by revision {cfg.revision}")
    if req.params.spatial_refs and (req.image is None or not cfg.reasoning_supported):
        raise ValueError("spatial_refs need an image and revision 2025-06-21")
    if req.image is None and not cfg.reasoning_supported:
        raise ValueError(f"a query without an image is not supported by revision {cfg.revision}")


def _nothing_to_check(req: EngineRequest, cfg) -> None:  # the edge checked all a caption/detect/point carries
    pass


_SKILL_CHECKS = {"caption": _nothing_to_check, "query": _check_query, "detect": _nothing_to_check,
                 "point": _nothing_to_check}


class Recorder:
    """For tests: what the scheduler fed and the first lm_head rows it computed, for chosen
    request ids.  Set `scheduler.recorder = Recorder(ids)`; None (the default) costs nothing."""

    LOGIT_ROWS = 8

    def __init__(self, request_ids=()):
        self.wanted = set(request_ids)
        self.records: dict[str, dict] = {}

    def _record(self, request_id: str) -> Optional[dict]:
        if request_id not in self.wanted:
            return None
        return self.records.setdefault(request_id, {"logits": [], "feeds": []})

    def logits(self, request_ids: list[str], logits: torch.Tensor) -> None:
        for row, request_id in enumerate(request_ids):
            rec = self._record(request_id)
            if rec is not None and len(rec["logits"]) < self.LOGIT_ROWS:
                rec["logits"].append(logits[row].clone().cpu())

    def feed(self, request_id: str, feed: P.Feed) -> None:
        rec = self._record(request_id)
        if rec is not None:
            rec["feeds"].append(feed.tokens)


def rows_by_image(seqs: list[Sequence]) -> list[Sequence]:
    """The batch's rows reordered so that the rows on one image sit side by side: images
    shared by several rows first, then rows without an image, rows alone on their image
    last.  The CPU's split attention then reads every group (and the rows it gathers
    together) as one slice of the batch, a view, instead of indexing rows every layer.
    Rows are computed independently, so their order changes no answer."""
    prefixes = [s.kv.prefix for s in seqs]
    if all(p is None for p in prefixes):
        return seqs
    counts = collections.Counter(id(p) for p in prefixes if p is not None)
    first: dict[int, int] = {}
    for i, p in enumerate(prefixes):
        first.setdefault(id(p), i)

    def place(i: int) -> tuple[int, int]:
        p = prefixes[i]
        kind = 1 if p is None else (0 if counts[id(p)] > 1 else 2)
        return kind, first[id(p)]
    return [seqs[i] for i in sorted(range(len(seqs)), key=place)]


def kv_pool_blocks(engine, max_batch: int, context: int, block_size: int, kv_cache_bytes: Optional[int] = None,
                   share: float = 0.8) -> int:
    """Blocks of the KV pool: KV_CACHE_GB when set, else what the slot design used to take:
    room for `max_batch` sequences of the full context (image prefix included), within
    `share` of the free device memory on CUDA (weights are already loaded) or a quarter
    of the RAM available now on the CPU.  At least one full-context sequence's worth."""
    cfg = engine.config
    block_bytes = kv_bytes_per_position(cfg, engine.kv_dtype) * block_size
    prefix = min(cfg.prefix_attn, context)
    per_sequence = -(-prefix // block_size) + -(-(context - prefix) // block_size)
    if kv_cache_bytes:
        return max(1, int(kv_cache_bytes // block_bytes))
    if engine.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(engine.device)
        budget = free * share
    else:
        try:
            import os

            budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4
        except (ValueError, OSError, AttributeError):
            budget = float("inf")
    return max(per_sequence, min(max_batch * per_sequence, int(budget // block_bytes)))


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose cumulative probability before them is within
    top_p, renormalised.  Works on (V,) or (B, V); top_p a float or a (B, 1) tensor."""
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(before > top_p, 0.0)
    sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)
