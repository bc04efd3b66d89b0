"""MOONDREAM_ENGINE=transformers: the official Hugging Face remote code, one request
at a time, behind the same scheduler interface as the native engine.

For users who want the reference implementation itself.  It needs the hub (or a
local copy of the remote-code repo) and decodes one sequence at a time; the
native engine is the fast path.  The remote model takes a PIL image, so requests
must carry the decoded pixels (`ImageInput.pixels`); it caches encoded images by
the same pixel key as the native engine.
"""
from __future__ import annotations

import collections
import time
from typing import Iterator, Optional

from gpu_worker.checkpoint import KNOWN_REVISIONS, ModelLoadError, resolve_device, resolve_dtype
from gpu_worker.engine_types import EngineRequest, Failed, Finished, TextChunk
from gpu_worker.programs import DEFAULT_SETTINGS
from shared.protocol import check_params_match


def remote_tokenizer(hf_model):
    """The remote code's `tokenizers.Tokenizer`.  Its Hugging Face wrapper
    (hf_moondream.py) holds the real model as `.model`, and the tokenizer is an
    attribute of that inner model, not of the wrapper."""
    for holder in (getattr(hf_model, "model", None), hf_model):
        tokenizer = getattr(holder, "tokenizer", None)
        if tokenizer is not None:
            return tokenizer
    raise ModelLoadError("the remote code's model has no tokenizer (looked for model.model.tokenizer): "
                         "an unsupported revision of the remote code?")


class TransformersEngine:
    kind = "transformers"

    def __init__(self, hf_model, info: dict):
        self.model = hf_model
        self.info = info
        self.tokenizer = remote_tokenizer(hf_model)

    @classmethod
    def load(cls, config) -> "TransformersEngine":
        if config.revision not in KNOWN_REVISIONS:
            raise ModelLoadError(f"revision {config.revision!r} is not supported (known: {', '.join(KNOWN_REVISIONS)})")
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device, config.revision)
        try:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                config.model, revision=config.revision, trust_remote_code=True,
                torch_dtype=dtype, token=config.hf_token or None,
            ).to(device)
        except Exception as err:
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelLoadError(
                f"could not load {config.model}@{config.revision} with transformers ({type(err).__name__}: {first_line})"
            ) from None
        info = {"name": f"{config.model}@{config.revision}", "revision": config.revision, "device": str(device),
                "dtype": str(dtype).replace("torch.", ""), "engine": cls.kind, "test_model": False}
        return cls(model, info)

    def create_scheduler(self, max_batch: int = 1, image_cache_bytes: int = 0, **_):
        return SerialScheduler(self)


class SerialScheduler:
    """One request at a time.  `step()` advances the current request by one
    streamed chunk, so the worker still polls its socket between chunks."""

    def __init__(self, engine: TransformersEngine, image_cache_entries: int = 8):
        self.engine = engine
        self.waiting: collections.deque[EngineRequest] = collections.deque()
        self.current: Optional[tuple[EngineRequest, Iterator]] = None
        self.encoded: collections.OrderedDict = collections.OrderedDict()  # pixel key -> EncodedImage
        self.image_cache_entries = image_cache_entries
        self.counters = collections.Counter()

    def add(self, req: EngineRequest) -> None:
        if req.skill not in ("caption", "query", "detect", "point"):
            raise ValueError(f"unknown skill {req.skill!r}")
        if req.image is None and req.skill != "query":
            raise ValueError(f"{req.skill} needs an image")
        if req.image is not None and getattr(req.image, "pixels", None) is None:
            raise ValueError("the transformers engine needs the decoded image pixels")
        check_params_match(req.skill, req.params)
        req.settings = req.settings.filled(DEFAULT_SETTINGS)
        self.waiting.append(req)

    def abort(self, request_id: str) -> None:
        self.waiting = collections.deque(r for r in self.waiting if r.request_id != request_id)
        if self.current and self.current[0].request_id == request_id:
            self.current[1].close()
            self.current = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.current)

    def free_slots(self) -> int:
        return 0 if self.has_work() else 1

    def stats(self) -> dict:
        return {"running": int(self.current is not None), "waiting": len(self.waiting),
                "image_encodes": self.counters["image_encodes"], "image_cache_hits": self.counters["image_cache_hits"]}

    def step(self) -> list:
        if self.current is None:
            if not self.waiting:
                return []
            req = self.waiting.popleft()
            self.current = (req, self._run(req))
        req, events = self.current
        try:
            event = next(events)
        except StopIteration:
            self.current = None
            return []
        except Exception as err:  # the remote code raised: this request fails, the worker lives
            self.current = None
            return [Failed(req.request_id, f"{type(err).__name__}: {err}")]
        if not isinstance(event, TextChunk):
            self.current = None
        return [event]

    # ------------------------------------------------------------------ one request
    def _image(self, req: EngineRequest):
        if req.image is None:
            return None
        key = req.image.key
        if key and key in self.encoded:
            self.encoded.move_to_end(key)
            self.counters["image_cache_hits"] += 1
            return self.encoded[key]
        from PIL import Image

        encoded = self.engine.model.encode_image(Image.fromarray(req.image.pixels))
        self.counters["image_encodes"] += 1
        if key:
            self.encoded[key] = encoded
            while len(self.encoded) > self.image_cache_entries:
                self.encoded.popitem(last=False)
        return encoded

    def _run(self, req: EngineRequest) -> Iterator:
        model, s = self.engine.model, req.settings
        started = time.perf_counter()
        image = self._image(req)
        text_settings = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens}
        if req.skill in ("detect", "point"):
            call = model.detect if req.skill == "detect" else model.point
            output = call(image, req.params.object, settings={"max_objects": s.max_objects})
            yield Finished(req.request_id, {k: output[k] for k in ("objects", "points") if k in output}, None,
                           self._metrics(started, started, 0))
            return
        if req.skill == "caption":
            result = model.caption(image, length=req.params.length, stream=True, settings=text_settings)
            key = "caption"
        else:
            kwargs = {"reasoning": True} if req.params.reasoning else {}
            if req.params.spatial_refs:
                kwargs["spatial_refs"] = req.params.spatial_refs
            result = model.query(image, req.params.question, stream=True, settings=text_settings, **kwargs)
            key = "answer"
        pieces, first = [], None
        for piece in result[key]:
            first = first or time.perf_counter()
            pieces.append(piece)
            yield TextChunk(req.request_id, piece)
        output = {key: "".join(pieces)}
        if result.get("reasoning") is not None:
            output["reasoning"] = result["reasoning"]
        # The remote code does not report why it stopped; equal to the limit means "length".
        n_tokens = len(self.engine.tokenizer.encode(output[key]).ids)
        finish = "length" if n_tokens >= s.max_tokens else "stop"
        yield Finished(req.request_id, output, finish, self._metrics(started, first or time.perf_counter(), n_tokens))

    @staticmethod
    def _metrics(started: float, first: float, output_tokens: int) -> dict:
        now = time.perf_counter()
        return {"input_tokens": 0, "output_tokens": output_tokens,
                "prefill_time_ms": round((first - started) * 1000, 3),
                "decode_time_ms": round((now - first) * 1000, 3),
                "ttft_ms": round((first - started) * 1000, 3), "image_cache_hit": False}
