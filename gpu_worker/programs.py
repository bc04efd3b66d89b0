"""What each skill does, step by step, written as a Python generator per request.

A program yields `Feed`s (inputs for its next positions, plus what it wants back
from that step: a sampled token, a coordinate, a size) and receives a
`StepResult`.  The scheduler runs the feeds of many programs as one batch, so a
program reads like the single-request algorithm in the model spec while the GPU
sees a batch.  A program returns (output dict, finish_reason).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generator, Optional

import torch

from shared.protocol import (DEFAULT_MAX_OBJECTS, DEFAULT_MAX_TOKENS, CaptionParams, QueryParams, SamplingSettings,
                             SkillParams)

DEFAULT_SETTINGS = SamplingSettings(temperature=0.5, top_p=0.3, max_tokens=DEFAULT_MAX_TOKENS,
                                    max_objects=DEFAULT_MAX_OBJECTS)
MOONDREAM3_SETTINGS = SamplingSettings(temperature=0.5, top_p=0.9, max_tokens=DEFAULT_MAX_TOKENS, max_objects=150)


def default_settings(cfg) -> SamplingSettings:
    """The settings a request leaves out take the model's defaults."""
    return MOONDREAM3_SETTINGS if cfg.is_moondream3 else DEFAULT_SETTINGS


def reasoning_wanted(cfg, params: SkillParams) -> bool:
    """Moondream 3 reasons unless the request says not to; Moondream 2 only when asked."""
    flag = params.reasoning if isinstance(params, QueryParams) else False
    return bool(cfg.is_moondream3 if flag is None else flag)


@dataclass(frozen=True)
class SampleSpec:
    temperature: float
    top_p: float
    suppress: tuple[int, ...] = ()  # token ids whose logit is set to -inf first
    choices: tuple[int, ...] = ()  # greedy choice among only these ids; the first wins a tie


@dataclass
class Feed:
    tokens: Optional[list[int]] = None  # token ids for the next positions, or
    embeds: Optional[torch.Tensor] = None  # (T, C) ready embeddings
    sample: Optional[SampleSpec] = None
    coord: bool = False  # decode a coordinate from the last position's hidden state
    size: bool = False  # decode a (width, height) from it

    @property
    def length(self) -> int:
        return len(self.tokens) if self.tokens is not None else self.embeds.shape[0]


@dataclass
class StepResult:
    token: Optional[int] = None
    coord: Optional[float] = None
    size: Optional[tuple[float, float]] = None


@dataclass
class ProgramContext:
    """What a program may use besides the step results."""

    engine: object  # gpu_worker.engine.Engine
    emit: Callable[[str], None]  # streams a text chunk to the client
    stream: bool = True  # False: nobody reads chunks, so no per-token detokenisation (text decoded once)
    position: int = 0  # next free position (kept current by the scheduler)
    context: int = 2048  # positions available to this sequence (its KV slot's length)
    output_tokens: int = 0
    counters: dict = field(default_factory=dict)

    def room(self) -> int:
        return self.context - self.position


Program = Generator[Feed, StepResult, tuple[dict, Optional[str]]]


# ------------------------------------------------------------------------- streaming
def _is_cjk(ch: str) -> bool:
    c = ord(ch)
    return 0x4E00 <= c <= 0x9FFF or 0x3400 <= c <= 0x4DBF or 0x2F800 <= c <= 0x2FA1F


class TextStreamer:
    """Turns tokens into printable chunks the way the reference segments them:
    flush on newline, after a CJK ideograph, or up to the last space."""

    def __init__(self, decode: Callable[[list[int]], str], emit: Callable[[str], None]):
        self.decode = decode
        self.emit = emit
        self.pending: list[int] = []
        self.printed = 0
        self.text_parts: list[str] = []

    def add(self, token: int) -> None:
        self.pending.append(token)
        text = self.decode(self.pending)
        if text.endswith("\n"):
            piece = text[self.printed:]
            self.pending, self.printed = [], 0
        elif text and _is_cjk(text[-1]):
            piece = text[self.printed:]
            self.printed += len(piece)
        else:
            piece = text[self.printed:text.rfind(" ") + 1]
            self.printed += len(piece)
        self._out(piece)

    def finish(self) -> str:
        if self.pending:
            self._out(self.decode(self.pending)[self.printed:])
        return "".join(self.text_parts)

    def _out(self, piece: str) -> None:
        if piece:
            self.text_parts.append(piece)
            self.emit(piece)


# ------------------------------------------------------------------------- prompts
def _tok(ctx: ProgramContext) -> dict:
    return ctx.engine.config.tokenizer


def encode_text(ctx: ProgramContext, text: str) -> list[int]:
    return ctx.engine.tokenizer.encode(text, add_special_tokens=False).ids


def caption_prompt(ctx, length: str) -> list[int]:
    return list(_tok(ctx)["templates"]["caption"][length])


def query_prompt(ctx, question: str, reasoning: bool, spatial_refs: list) -> list[int]:
    tok = _tok(ctx)
    t = tok["templates"]["query"]
    if ctx.engine.config.revision == "2025-04-14":
        return list(t["prefix"]) + encode_text(ctx, " " + question) + list(t["suffix"])
    refs = []
    for ref in spatial_refs or []:
        refs += [tok["coord_id"], tok["coord_id"]] + ([tok["size_id"]] if len(ref) == 4 else [])
    if ctx.engine.config.is_moondream3:  # one answer token; the thinking token takes its place
        return list(t["prefix"]) + refs + encode_text(ctx, question) + ([tok["thinking_id"]] if reasoning else list(t["suffix"]))
    last = tok["thinking_id"] if reasoning else tok["answer_id"]
    return list(t["prefix"]) + refs + encode_text(ctx, question) + list(t["suffix"]) + [last]


def answer_prefill(ctx) -> list[int]:
    """What is prefilled after the reasoning, before the answer."""
    if ctx.engine.config.is_moondream3:
        return list(_tok(ctx)["templates"]["query"]["suffix"])
    return [_tok(ctx)["answer_id"]]


def object_prompt(ctx, skill: str, obj: str) -> list[int]:
    t = _tok(ctx)["templates"][skill]
    return list(t["prefix"]) + encode_text(ctx, " " + obj) + list(t["suffix"])


def spatial_ref_embeddings(ctx, prompt: list[int], spatial_refs: list) -> torch.Tensor:
    """Prompt embeddings with coord/size positions replaced by the refs' encodings."""
    engine = ctx.engine
    tok = _tok(ctx)
    coords, sizes = [], []
    for ref in spatial_refs:
        if len(ref) == 2:
            coords += [ref[0], ref[1]]
        else:
            x0, y0, x1, y1 = ref
            coords += [(x0 + x1) / 2, (y0 + y1) / 2]
            sizes.append([x1 - x0, y1 - y0])
    embeds = engine.embed_tokens(prompt)
    ids = torch.tensor(prompt, device=embeds.device)
    embeds[ids == tok["coord_id"]] = engine.encode_coordinates(coords)
    if sizes:
        embeds[ids == tok["size_id"]] = engine.encode_sizes(sizes)
    return embeds


# ------------------------------------------------------------------------- text generation
def text_answer(ctx: ProgramContext, first: StepResult, spec_after: SampleSpec, stop_id: int,
                max_tokens: int) -> Generator[Feed, StepResult, tuple[str, str]]:
    """Sample until stop_id or max_tokens; `first` holds the token sampled from the
    prefill logits (nothing suppressed there).  Returns (text, finish_reason)."""
    engine = ctx.engine
    # streamed: chunks as the reference segments them; not streamed: the tokens decoded once at the end
    streamer = TextStreamer(engine.decode, ctx.emit) if ctx.stream else None
    tokens: list[int] = []
    token, emitted = first.token, 0
    finish = "stop"
    while token != stop_id:
        if ctx.room() < 1:
            finish = "length"
            break
        if streamer is not None:
            streamer.add(token)
        else:
            tokens.append(token)
        emitted += 1
        ctx.output_tokens += 1
        if emitted >= max_tokens:
            # The reference feeds this token too and discards what follows; that step
            # changes no output, so it is skipped (a third of the work of 3-token answers).
            finish = "length"
            break
        token = (yield Feed(tokens=[token], sample=spec_after)).token
    return (streamer.finish() if streamer is not None else engine.decode(tokens)), finish


def run_caption(ctx: ProgramContext, params: CaptionParams, settings: SamplingSettings) -> Program:
    prompt = caption_prompt(ctx, params.length)
    first = yield Feed(tokens=prompt, sample=_spec(settings))
    text, finish = yield from text_answer(ctx, first, _spec(settings, _suppress_answer(ctx)),
                                         _tok(ctx)["eos_id"], settings.max_tokens)
    return {"caption": text}, finish


def run_query(ctx: ProgramContext, params: QueryParams, settings: SamplingSettings, has_image: bool) -> Program:
    tok = _tok(ctx)
    refs = params.spatial_refs
    reasoning = reasoning_wanted(ctx.engine.config, params)
    prompt = query_prompt(ctx, params.question, reasoning, refs)
    if not has_image:
        prompt = [tok["bos_id"]] + prompt
    feed = Feed(embeds=spatial_ref_embeddings(ctx, prompt, refs)) if refs else Feed(tokens=prompt)
    feed.sample = _spec(settings)
    feed.coord = reasoning  # a first reasoning token may be `coord`
    first = yield feed
    output = {}
    budget = settings.max_tokens
    if reasoning:
        before = ctx.output_tokens
        text, grounding = yield from reasoning_trace(ctx, first, settings)
        output["reasoning"] = {"text": text, "grounding": grounding}
        if params.total_cap:
            # Chat's max_completion_tokens caps reasoning and answer together (OpenAI's meaning);
            # /v1/query, like the reference, gives each its own max_tokens.
            budget -= ctx.output_tokens - before
            if budget < 1:
                return {"answer": "", **output}, "length"
        first = yield Feed(tokens=answer_prefill(ctx), sample=_spec(settings))
    answer, finish = yield from text_answer(ctx, first, _spec(settings, _suppress_answer(ctx)),
                                           tok["eos_id"], budget)
    return {"answer": answer, **output}, finish


def reasoning_trace(ctx: ProgramContext, first: StepResult, settings: SamplingSettings):
    """Reasoning tokens until the answer token; `coord` tokens are fed back as the
    coordinate they decode to and recorded as grounding points."""
    tok = _tok(ctx)
    spec = _spec(settings, (tok["eos_id"], tok["size_id"]))
    chunks: list[list[int]] = [[]]
    values: list[list[float]] = [[]]
    result, emitted = first, 0
    while result.token != tok["answer_id"] and emitted < settings.max_tokens and ctx.room() > 1:
        token = result.token
        if token in (tok["start_ground_points_id"], tok["end_ground_id"]):
            chunks.append([])
            values.append([])
        chunks[-1].append(token)
        if token == tok["coord_id"]:
            values[-1].append(result.coord)
            feed = Feed(embeds=ctx.engine.encode_coordinates([result.coord]))
        else:
            feed = Feed(tokens=[token])
        feed.sample, feed.coord = spec, True
        emitted += 1
        ctx.output_tokens += 1
        result = yield feed
    texts = [ctx.engine.decode(c) for c in chunks]
    grounding, start = [], 0
    for text, vals in zip(texts, values):
        if len(vals) > 1:
            points = [[vals[i], vals[i + 1]] for i in range(0, len(vals) - 1, 2)]
            grounding.append({"start_idx": start, "end_idx": start + len(text), "points": points})
        start += len(text)
    return "".join(texts), grounding


def run_objects(ctx: ProgramContext, skill: str, params: SkillParams, settings: SamplingSettings) -> Program:
    """detect (boxes) and point: coordinates decoded from hidden states, greedily."""
    engine = ctx.engine
    eos = _tok(ctx)["eos_id"]
    greedy = SampleSpec(0.0, 0.0)
    # after an object Moondream 3 only chooses between `coord` (on a tie too) and EOS;
    # Moondream 2 takes the argmax over the whole vocabulary and goes on unless it is EOS
    after_object = SampleSpec(0.0, 0.0, choices=(_tok(ctx)["coord_id"], eos)) if engine.config.is_moondream3 else greedy
    with_size = skill == "detect"
    result = yield Feed(tokens=object_prompt(ctx, skill, params.object), sample=greedy, coord=True)
    found: list[dict] = []
    while result.token != eos and len(found) < settings.max_objects and ctx.room() > 3:
        x = result.coord
        y = (yield Feed(embeds=engine.encode_coordinates([x]), coord=True)).coord
        if with_size:
            w, h = (yield Feed(embeds=engine.encode_coordinates([y]), size=True)).size
            found.append({"x_min": x - w / 2, "y_min": y - h / 2, "x_max": x + w / 2, "y_max": y + h / 2})
            next_input = engine.encode_sizes([[w, h]])
        else:
            found.append({"x": x, "y": y})
            next_input = engine.encode_coordinates([y])
        ctx.output_tokens += 1
        result = yield Feed(embeds=next_input, sample=after_object, coord=True)
    return ({"objects": found} if with_size else {"points": found}), None


def _spec(settings: SamplingSettings, suppress: tuple = ()) -> SampleSpec:
    return SampleSpec(float(settings.temperature), float(settings.top_p), tuple(suppress))


def _suppress_answer(ctx) -> tuple:
    """2025-06-21 never lets the answer token out after the prefill step."""
    return () if ctx.engine.config.revision == "2025-04-14" else (_tok(ctx)["answer_id"],)


def prompt_length(engine, skill: str, params: SkillParams, has_image: bool) -> int:
    """Positions of the prompt a program feeds first (after the image prefix, if any)."""
    ctx = ProgramContext(engine=engine, emit=lambda _: None)
    if skill == "caption":
        return len(caption_prompt(ctx, params.length))
    if skill == "query":
        reasoning = reasoning_wanted(engine.config, params)
        prompt = query_prompt(ctx, params.question, reasoning, params.spatial_refs)
        return len(prompt) + (0 if has_image else 1)  # a text-only query starts with BOS
    return len(object_prompt(ctx, skill, params.object))


def generated_positions(config, skill: str, params: SkillParams, settings: SamplingSettings) -> int:
    """Most positions a program feeds after its prompt (the KV blocks admission reserves):
    an answer feeds back at most max_tokens - 1 tokens; reasoning feeds all its max_tokens,
    the answer token, then an answer; each object takes 3 positions (detect) or 2 (point)."""
    if skill in ("detect", "point"):
        return (3 if skill == "detect" else 2) * int(settings.max_objects)
    tokens = int(settings.max_tokens)
    return 2 * tokens if reasoning_wanted(config, params) else tokens


def start_program(ctx: ProgramContext, skill: str, params: SkillParams, settings: SamplingSettings,
                  has_image: bool) -> Program:
    if skill == "caption":
        return run_caption(ctx, params, settings)
    if skill == "query":
        return run_query(ctx, params, settings, has_image)
    if skill in ("detect", "point"):
        return run_objects(ctx, skill, params, settings)
    raise ValueError(f"unknown skill {skill!r}")
