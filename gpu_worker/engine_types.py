"""Values passed between the GPU worker's process loop and the engine's scheduler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from shared.protocol import SamplingSettings, SkillParams


@dataclass
class ImageInput:
    crops: np.ndarray  # uint8 (n_crops, 378, 378, 3): global crop first, then row-major local crops
    tiling: tuple[int, int]  # (rows, cols) of the local crops
    key: str = ""  # hash of the decoded pixels; same key = same image = reuse its encoded prefix
    pixels: Optional[np.ndarray] = None  # decoded RGB (H, W, 3): only the transformers engine needs it


@dataclass
class EngineRequest:
    request_id: str
    skill: str  # "caption" | "query" | "detect" | "point"
    params: SkillParams  # Generate.params: the skill's struct (shared/protocol.py)
    settings: SamplingSettings = SamplingSettings()  # Generate.settings; None fields = model defaults (filled by add())
    image: Optional[ImageInput] = None  # None only for a text-only query
    seed: Optional[int] = None  # sampling seed; None = random
    variant: Optional[str] = None  # fine-tuned variant id (Generate.variant); None = base model
    priority: int = 0  # protocol.INTERACTIVE (0), or protocol.BACKGROUND (-1) for batch lines
    stream: bool = True  # the client reads text chunks as they come; False: text decoded once, at the end
    kv_positions: int = 0  # most positions it may use (prefix + prompt + generation, within the context): set by Scheduler.add


@dataclass
class TextChunk:
    request_id: str
    text: str


@dataclass
class Finished:
    request_id: str
    output: dict  # API body: {"caption"} | {"answer", "reasoning"?} | {"objects"} | {"points"}
    finish_reason: Optional[str]  # "stop" | "length" for caption/query, None for detect/point
    metrics: dict  # input_tokens, output_tokens, prefill_time_ms, decode_time_ms, ttft_ms, image_cache_hit


@dataclass
class Failed:
    request_id: str
    message: str
    status: int = 500
    code: str = ""  # machine-readable reason for the client; "" = derived from status


EngineEvent = Union[TextChunk, Finished, Failed]
