"""The transformers-engine adapter, driven with a stand-in for the official remote-code
model (it cannot be downloaded here).  The stand-in is named as such, mirrors the
remote code's structure (a Hugging Face wrapper whose `.model` is the Moondream
model holding the methods and the tokenizer), records calls and returns fixed
shapes of output, like the remote code's API."""
from __future__ import annotations

import os

import numpy as np
import pytest
from tokenizers import Tokenizer

from gpu_worker.checkpoint import ModelLoadError
from gpu_worker.engine_types import EngineRequest, Failed, Finished, ImageInput, TextChunk
from gpu_worker.transformers_engine import TransformersEngine
from shared.config import Config
from shared.protocol import CaptionParams, DetectParams, PointParams, QueryParams, SamplingSettings

FIXTURE_TOKENIZER = os.path.join(os.path.dirname(__file__), "conformance", "main", "tokenizer.json")


class MoondreamModelStandIn:
    """The inner model of vikhyatk/moondream2's remote code: the skills and the
    tokenizer (a real `tokenizers.Tokenizer`, the fixtures' small one)."""

    def __init__(self, fail_on=None):
        self.tokenizer = Tokenizer.from_file(FIXTURE_TOKENIZER)
        self.encoded = 0
        self.calls = []
        self.fail_on = fail_on

    def encode_image(self, image):
        self.encoded += 1
        return ("encoded", image.size)

    def caption(self, image, length="normal", stream=False, settings=None):
        self.calls.append(("caption", image, length, settings))
        return {"caption": iter(["A ", "cat ", "on a mat."])}

    def query(self, image=None, question=None, stream=False, settings=None, reasoning=False, spatial_refs=None):
        self.calls.append(("query", image, question, reasoning, spatial_refs))
        if self.fail_on == "query":
            raise RuntimeError("CUDA out of memory")
        out = {"answer": iter(["Two ", "dogs."])}
        if reasoning:
            out["reasoning"] = {"text": "counting", "grounding": []}
        return out

    def detect(self, image, obj, settings=None):
        self.calls.append(("detect", image, obj, settings))
        return {"objects": [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}]}

    def point(self, image, obj, settings=None):
        self.calls.append(("point", image, obj, settings))
        return {"points": [{"x": 0.5, "y": 0.5}]}


class RemoteCodeWrapperStandIn:
    """The remote code's Hugging Face wrapper (HfMoondream): the Moondream model is
    `.model`, the skills are properties handing out its methods, and the wrapper
    itself has no tokenizer."""

    def __init__(self, inner: MoondreamModelStandIn):
        self.model = inner

    encode_image = property(lambda self: self.model.encode_image)
    caption = property(lambda self: self.model.caption)
    query = property(lambda self: self.model.query)
    detect = property(lambda self: self.model.detect)
    point = property(lambda self: self.model.point)


def image(key="k1"):
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    return ImageInput(crops=np.zeros((2, 378, 378, 3), np.uint8), tiling=(1, 1), key=key, pixels=pixels)


def drain(sched):
    events = []
    while sched.has_work():
        events += sched.step()
    return events


def make(fail_on=None):
    stand_in = MoondreamModelStandIn(fail_on)
    engine = TransformersEngine(RemoteCodeWrapperStandIn(stand_in), {"engine": "transformers"})
    return stand_in, engine.create_scheduler()


def test_caption_streams_chunks_then_finishes():
    stand_in, sched = make()
    sched.add(EngineRequest("r1", "caption", CaptionParams(length="short"), SamplingSettings(max_tokens=50), image()))
    events = drain(sched)
    assert [e.text for e in events if isinstance(e, TextChunk)] == ["A ", "cat ", "on a mat."]
    assert isinstance(events[-1], Finished) and events[-1].output == {"caption": "A cat on a mat."}
    assert stand_in.calls[0][2] == "short" and stand_in.calls[0][3]["max_tokens"] == 50


def test_output_tokens_counted_with_the_inner_models_tokenizer():
    stand_in, sched = make()
    sched.add(EngineRequest("r1", "caption", CaptionParams(), SamplingSettings(max_tokens=50), image()))
    finished = drain(sched)[-1]
    expected = len(stand_in.tokenizer.encode("A cat on a mat.").ids)
    assert expected > 0 and finished.metrics["output_tokens"] == expected
    assert finished.finish_reason == "stop"


def test_answer_as_long_as_max_tokens_finishes_by_length():
    stand_in, sched = make()
    n_tokens = len(stand_in.tokenizer.encode("Two dogs.").ids)
    sched.add(EngineRequest("at", "query", QueryParams(question="how many?"), SamplingSettings(max_tokens=n_tokens), image()))
    sched.add(EngineRequest("under", "query", QueryParams(question="how many?"), SamplingSettings(max_tokens=n_tokens + 1), image()))
    done = {e.request_id: e for e in drain(sched) if isinstance(e, Finished)}
    assert done["at"].finish_reason == "length" and done["at"].metrics["output_tokens"] == n_tokens
    assert done["under"].finish_reason == "stop"


def test_a_model_without_a_tokenizer_is_a_load_error():
    inner = MoondreamModelStandIn()
    del inner.tokenizer
    with pytest.raises(ModelLoadError, match="tokenizer"):
        TransformersEngine(RemoteCodeWrapperStandIn(inner), {"engine": "transformers"})


def test_one_request_at_a_time_and_image_reuse():
    stand_in, sched = make()
    for i in range(3):
        sched.add(EngineRequest(f"q{i}", "query", QueryParams(question="how many?"), SamplingSettings(), image("same")))
    assert sched.free_slots() == 0
    events = drain(sched)
    finished = [e.request_id for e in events if isinstance(e, Finished)]
    assert finished == ["q0", "q1", "q2"]
    assert stand_in.encoded == 1 and sched.stats()["image_cache_hits"] == 2


def test_reasoning_detect_point_and_text_only():
    stand_in, sched = make()
    sched.add(EngineRequest("a", "query", QueryParams(question="q", reasoning=True), SamplingSettings(), image()))
    sched.add(EngineRequest("b", "detect", DetectParams(object="cat"), SamplingSettings(max_objects=3), image()))
    sched.add(EngineRequest("c", "point", PointParams(object="cat"), SamplingSettings(), image()))
    sched.add(EngineRequest("d", "query", QueryParams(question="hello"), SamplingSettings(), None))
    done = {e.request_id: e for e in drain(sched) if isinstance(e, Finished)}
    assert done["a"].output["reasoning"]["text"] == "counting"
    assert done["b"].output == {"objects": [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}]}
    assert done["c"].output == {"points": [{"x": 0.5, "y": 0.5}]}
    assert done["d"].output == {"answer": "Two dogs."} and stand_in.calls[-1][1] is None


def test_remote_code_error_fails_only_that_request():
    _, sched = make(fail_on="query")
    sched.add(EngineRequest("bad", "query", QueryParams(question="q"), SamplingSettings(), image()))
    sched.add(EngineRequest("good", "caption", CaptionParams(), SamplingSettings(), image()))
    events = drain(sched)
    assert isinstance(events[0], Failed) and "out of memory" in events[0].message
    assert isinstance(events[-1], Finished) and events[-1].request_id == "good"


def test_abort_mid_stream():
    _, sched = make()
    sched.add(EngineRequest("r", "caption", CaptionParams(), SamplingSettings(), image()))
    assert isinstance(sched.step()[0], TextChunk)
    sched.abort("r")
    assert not sched.has_work()


def test_needs_pixels_and_valid_skill():
    _, sched = make()
    with pytest.raises(ValueError):
        sched.add(EngineRequest("r", "caption", CaptionParams(), SamplingSettings(), ImageInput(np.zeros((1, 378, 378, 3), np.uint8), (1, 1))))
    with pytest.raises(ValueError):
        sched.add(EngineRequest("r", "segment", CaptionParams(), SamplingSettings(), image()))


def test_load_failure_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    from gpu_worker.engine import ModelLoadError, load_model

    with pytest.raises(ModelLoadError) as err:
        load_model(Config(engine="transformers", device="cpu"))
    assert "\n" not in str(err.value) and "vikhyatk/moondream2" in str(err.value)
