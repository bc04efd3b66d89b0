"""Continuous batching over the engine.

Each request becomes a `Sequence`: a KV-cache slot plus its skill's program
(programs.py).  One `step()`:
  1. admits waiting requests into free slots: images not in the image cache are
     encoded together (one vision forward, one prefix prefill), cached prefixes
     are copied into the slots;
  2. runs every running sequence's pending feed: all single-position feeds
     (decode steps) as one batch, longer feeds (prompt prefills) batched by length;
  3. samples / decodes what each feed asked for, in one batch, with one host sync;
  4. resumes each program, which yields its next feed or finishes.
Requests join and leave at every step; nothing in a sequence's arithmetic
depends on the others in its batch.

Batch lines (priority BACKGROUND) yield to interactive requests: they wait behind
them, never take the last `reserved_slots` slots, start their image encodes only
in steps where no interactive request starts (one image per step while
interactive sequences decode), and, with `batch_yield_s` > 0, decode at most one
step per `batch_yield_s` while interactive sequences run (on a CPU, where every
row costs step time), so a bulk job costs interactive users little.
"""
from __future__ import annotations

import collections
import heapq
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from gpu_worker import programs as P
from gpu_worker.engine_types import EngineRequest, Failed, Finished, TextChunk
from gpu_worker.model import PrefixKV
from gpu_worker.variants import Adapter, VariantError, VariantNotFound, VariantsUnsupported
from shared.protocol import INTERACTIVE, background_slots

VALID_LENGTHS = ("short", "normal", "long")


class PromptTooLong(ValueError):
    """The request's prompt does not fit in the context: the client's fault (422)."""


class ImageCache:
    """Encoded image prefixes by pixel hash, least recently used first out, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[str, PrefixKV] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0

    def get(self, key: str) -> Optional[PrefixKV]:
        prefix = self.entries.get(key) if key else None
        if prefix is not None:
            self.entries.move_to_end(key)
        return prefix

    def put(self, key: str, prefix: PrefixKV) -> None:
        if not key or key in self.entries:
            return
        size = prefix.bytes()
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.bytes()
        self.entries[key] = prefix
        self.bytes += size


@dataclass
class Sequence:
    request: EngineRequest
    slot: int
    ctx: P.ProgramContext
    program: P.Program
    feed: Optional[P.Feed] = None
    settings: dict = field(default_factory=dict)
    generator: Optional[torch.Generator] = None
    input_tokens: int = 0
    image_cache_hit: bool = False
    released: bool = False
    prefix: Optional[PrefixKV] = None  # its image's KV (also copied into its slot): batch rows on one image read it once
    adapter: Optional[Adapter] = None  # its variant's adapter, held for its whole life (eviction cannot touch it)
    t_added: float = 0.0
    t_started: float = 0.0
    t_first_output: float = 0.0
    t_prefill_done: float = 0.0


class Scheduler:
    def __init__(self, engine, max_batch: int = 32, image_cache_bytes: int = 1 << 30,
                 max_images_per_step: int = 8, context: Optional[int] = None, share_prefixes: bool = True,
                 max_encode_crops: int = 40, variants=None, reserved_slots: Optional[int] = None,
                 batch_yield_s: float = 0.0):
        self.engine = engine
        self.variants = variants  # gpu_worker.variants.VariantStore, or None: base model only
        self.max_batch = slots_that_fit(engine, max_batch, context)
        self.cache = engine.new_cache(self.max_batch, context)
        self.free = list(range(self.max_batch))  # a heap: the lowest free slot is taken first, keeping batches dense
        self.waiting: collections.deque[tuple[EngineRequest, float]] = collections.deque()
        self.awaiting_variant: dict[str, list[tuple[EngineRequest, float]]] = {}  # variant downloads in progress
        self.running: dict[str, Sequence] = {}
        self.images = ImageCache(image_cache_bytes)
        self.share_prefixes = share_prefixes
        self.max_images_per_step = max_images_per_step
        self.max_encode_crops = max_encode_crops
        # Slots batch lines may never take: an interactive request always finds one free.
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
        if req.variant is not None and self._variant_status(req.variant) == "fetching":
            self.awaiting_variant.setdefault(req.variant, []).append(entry)
            return
        self._enqueue(entry)

    def _enqueue(self, entry: tuple[EngineRequest, float]) -> None:
        """Append, but ahead of waiting requests of lower priority (batch lines), which stay at the tail."""
        position = len(self.waiting)
        while position > 0 and self.waiting[position - 1][0].priority < entry[0].priority:
            position -= 1
        self.waiting.insert(position, entry)

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

    def free_slots(self) -> int:
        return len(self.free) - len(self.waiting)

    def stats(self) -> dict:
        return {
            "running": len(self.running), "waiting": len(self.waiting), "free_slots": len(self.free),
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
        if self.running:
            self._run_feeds()
        self.counters["steps"] += 1
        return self.events

    # ------------------------------------------------------------------ admission
    def _validate(self, req: EngineRequest) -> None:
        """Check a request and fill in its settings (model defaults for those left out).
        Raises ValueError with a message for the client (422)."""
        s = P.default_settings(self.engine.config)
        s.update({k: v for k, v in (req.settings or {}).items() if v is not None})
        if "seed" in s:  # the chat route's `seed`: this request's own sampler starts from it
            req.seed = int(s.pop("seed"))
        if "variant" in s:
            req.variant = s.pop("variant")
        if req.variant is not None and self.engine.config.is_moondream3:
            raise VariantsUnsupported(f"variants are not supported for {self.engine.config.revision}: "
                                      "no Moondream 3 adapter format is pinned yet; ask the base model")
        check_skill = _SKILL_CHECKS.get(req.skill)
        if check_skill is None:
            raise ValueError(f"unknown skill {req.skill!r}")
        if req.image is None and req.skill != "query":
            raise ValueError(f"{req.skill} needs an image")
        check_skill(req, self.engine.config)
        if not (int(s["max_tokens"]) >= 1 and int(s["max_objects"]) >= 1):
            raise ValueError("max_tokens and max_objects must be at least 1")
        if float(s["temperature"]) < 0 or not (0.0 <= float(s["top_p"]) <= 1.0):
            raise ValueError("temperature must be >= 0 and top_p in [0, 1]")
        if self.engine.config.is_moondream3:
            self._check_context(req, s)
        req.settings = s

    def _check_context(self, req: EngineRequest, settings: dict) -> None:
        """Moondream 3: the prompt plus max_tokens must fit in the context (4,096 positions),
        checked before any work; its reference does not check and fails past the end."""
        ctx = P.ProgramContext(engine=self.engine, emit=lambda _: None)
        needed = P.prompt_length(ctx, req.skill, req.params, req.image is not None)
        if req.image is not None:
            needed += self.engine.config.prefix_attn
        if req.skill in ("caption", "query"):
            needed += int(settings["max_tokens"])
        if needed > self.cache.context:
            raise PromptTooLong(f"the prompt and max_tokens need {needed} positions; "
                                f"the model's context holds {self.cache.context}")

    # ------------------------------------------------------------------ variants
    def _variant_status(self, variant: str) -> str:
        if self.variants is None:
            raise VariantNotFound(f"variant {variant} is not available: this server serves the base model only")
        return self.variants.status(variant)

    def _collect_downloads(self) -> None:
        """Requests whose variant finished downloading join the queue (or fail with its error)."""
        if self.variants is None or not self.awaiting_variant:
            return
        for variant, err in self.variants.poll_downloads():
            for req, t_added in self.awaiting_variant.pop(variant, []):
                if err is None:
                    self._enqueue((req, t_added))
                else:
                    self.events.append(Failed(req.request_id, str(err), err.status, err.code))

    def _adapter_for(self, req: EngineRequest) -> Optional[Adapter]:
        """Loads the variant if needed (within this step: others wait at most one step)."""
        return self.variants.get(req.variant) if req.variant is not None else None

    @staticmethod
    def _image_cache_key(req: EngineRequest) -> str:
        """An encoded prefix belongs to one variant: its adapters act in the prefix prefill."""
        if req.image is None or not req.image.key:
            return ""
        return f"{req.variant}|{req.image.key}" if req.variant else req.image.key

    def _admit(self) -> None:
        """Start waiting requests in free slots.  While others are decoding, only
        `max_encode_crops` crops of new images are encoded per step, so a burst of
        large images delays the running streams by one bounded step, not by all of it.
        Batch lines come last (the queue keeps them at its tail) and yield, see the module's doc."""
        batch: list[tuple[EngineRequest, float]] = []
        crops_budget = self.max_encode_crops if self.running else None
        new_keys: set[str] = set()
        interactive_running = any(s.request.priority >= INTERACTIVE for s in self.running.values())
        background_encodes = 0
        while self.waiting and len(batch) < len(self.free):
            req = self.waiting[0][0]
            key = self._image_cache_key(req)
            needs_encode = req.image is not None and key not in new_keys and self.images.get(key) is None
            if req.priority < INTERACTIVE:
                if len(self.free) - len(batch) <= self.reserved_slots:
                    break  # the last slots stay free for interactive requests
                if needs_encode:
                    starting_interactive = any(r.priority >= INTERACTIVE for r, _ in batch)
                    if starting_interactive or (interactive_running and background_encodes >= 1):
                        break  # its encode would stall the interactive ones: a later step
                    background_encodes += 1
            if needs_encode and crops_budget is not None:
                if batch and crops_budget < len(req.image.crops):
                    break
                crops_budget -= len(req.image.crops)
            if needs_encode and key:
                new_keys.add(key)
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

    def _prefixes_for(self, requests: list[EngineRequest], adapters: dict) -> tuple[dict, set]:
        """Prefix per request id, from the image cache or encoded now (several images per
        forward, each under its request's variant), and the ids that were cache hits."""
        out, hits, to_encode = {}, set(), collections.OrderedDict()
        for req in requests:
            if req.image is None:
                continue
            key = self._image_cache_key(req)
            cached = self.images.get(key)
            if cached is not None:
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
                    self.images.put(self._image_cache_key(reqs[0]), prefix)
                for req in reqs:
                    out[req.request_id] = prefix
        return out, hits

    def _start(self, req: EngineRequest, prefix: Optional[PrefixKV], t_added: float, cache_hit: bool,
               adapter: Optional[Adapter] = None) -> None:
        slot = heapq.heappop(self.free)
        try:
            seq = self._new_sequence(req, slot, prefix, t_added, cache_hit, adapter)
        except BaseException:
            heapq.heappush(self.free, slot)  # not registered yet: nobody else would give the slot back
            raise
        self.running[req.request_id] = seq
        self._advance(seq, None)
        if seq.feed is not None:
            seq.input_tokens = seq.feed.length  # the prompt

    def _new_sequence(self, req: EngineRequest, slot: int, prefix: Optional[PrefixKV], t_added: float,
                      cache_hit: bool, adapter: Optional[Adapter]) -> Sequence:
        ctx = P.ProgramContext(engine=self.engine, emit=lambda text, rid=req.request_id: self._emit(rid, text),
                               context=self.cache.context)
        if prefix is not None:
            self.cache.load_prefix(slot, prefix)
            ctx.position = prefix.length
        program = P.start_program(ctx, req.skill, req.params, req.settings, req.image is not None)
        seq = Sequence(request=req, slot=slot, ctx=ctx, program=program, settings=req.settings,
                       t_added=t_added, t_started=time.perf_counter(), image_cache_hit=cache_hit,
                       prefix=prefix if self.share_prefixes else None, adapter=adapter)
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
                results += self._run_group(seqs, length)
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
        hidden = engine.forward(embeds, [s.ctx.position for s in seqs], [s.slot for s in seqs], self.cache,
                                [s.prefix for s in seqs], [s.adapter for s in seqs])
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
            logits = self.engine.logits(hidden[rows]).float()
            if self.recorder is not None:
                self.recorder.logits([seqs[i].request.request_id for i in rows], logits)
            banned = [(j, t) for j, spec in enumerate(specs) for t in spec.suppress]
            if banned:
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
        seq.prefix = None
        seq.adapter = None
        if seq.slot not in self.free:
            heapq.heappush(self.free, seq.slot)


# ---------------------------------------------------------------------- per-skill rules
def _check_caption(req: EngineRequest, cfg) -> None:
    if req.params.get("length", "normal") not in VALID_LENGTHS:
        raise ValueError("length must be one of short, normal, long")


def _check_query(req: EngineRequest, cfg) -> None:
    if not isinstance(req.params.get("question"), str):
        raise ValueError("question must be a string")
    if req.params.get("reasoning") and not cfg.reasoning_supported:  # None: the model's default
        raise ValueError(f"reasoning is not supported by revision {cfg.revision}")
    refs = req.params.get("spatial_refs") or []
    if refs and (req.image is None or not cfg.reasoning_supported):
        raise ValueError("spatial_refs need an image and revision 2025-06-21")
    for ref in refs:
        if len(ref) not in (2, 4) or not all(0.0 <= float(v) <= 1.0 for v in ref):
            raise ValueError("each spatial ref is [x, y] or [x_min, y_min, x_max, y_max] in 0..1")
    if req.image is None and not cfg.reasoning_supported:
        raise ValueError(f"a query without an image is not supported by revision {cfg.revision}")


def _check_region(req: EngineRequest, cfg) -> None:  # detect and point
    if not isinstance(req.params.get("object"), str):
        raise ValueError("object must be a string")


_SKILL_CHECKS = {"caption": _check_caption, "query": _check_query, "detect": _check_region, "point": _check_region}


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


def slots_that_fit(engine, wanted: int, context: Optional[int] = None, share: float = 0.8) -> int:
    """Admission control starts here: never allocate more KV slots than memory holds.
    On CUDA: `share` of the free device memory (weights are already loaded); on the
    CPU: a quarter of the RAM available now.  BATCH_SIZE is the upper bound."""
    cfg = engine.config
    positions = (context or cfg.max_context) + 1
    per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * positions * torch.finfo(engine.kv_dtype).bits // 8
    if engine.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(engine.device)
        budget = free * share
    else:
        try:
            import os

            budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4
        except (ValueError, OSError, AttributeError):
            budget = float("inf")
    return max(1, min(wanted, int(budget // per_slot)))


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose cumulative probability before them is within
    top_p, renormalised.  Works on (V,) or (B, V); top_p a float or a (B, 1) tensor."""
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(before > top_p, 0.0)
    sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)
