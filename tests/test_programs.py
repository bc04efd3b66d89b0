"""The query skill's reasoning program (gpu_worker/programs.py) driven step by step
with a scripted sequence of sampled tokens, on the real fixture engine.

Two rules of the model spec that the random conformance fixtures never reach in a
way that changes an output are pinned here: the size token is suppressed at every
reasoning decode step, and reasoning text is cut into chunks at the start-ground and
end-ground tokens (which decides the grounding entries' character ranges)."""
from __future__ import annotations

from gpu_worker.programs import ProgramContext, StepResult, run_query
from shared.protocol import QueryParams, SamplingSettings
from tests.engine_helpers import fixture_engine

SETTINGS = SamplingSettings(temperature=0.5, top_p=0.3, max_tokens=64, max_objects=50)


def engine_and_ids():
    engine = fixture_engine("edge-grounding")  # revision 2025-06-21: reasoning exists
    return engine, engine.config.tokenizer


def text_ids(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False).ids


def drive_reasoning_query(engine, script: list[StepResult]):
    """Run a reasoning query, answering its feeds with `script` in order.  Returns
    (feeds the program yielded, its output, its finish reason, streamed chunks)."""
    chunks: list[str] = []
    ctx = ProgramContext(engine=engine, emit=chunks.append)
    program = run_query(ctx, QueryParams(question="How many?", reasoning=True), SETTINGS, has_image=True)
    feeds = [next(program)]
    try:
        for result in script:
            feeds.append(program.send(result))
    except StopIteration as done:
        output, finish = done.value
        return feeds, output, finish, chunks
    raise AssertionError("the program did not finish on the scripted tokens")


def grounded_script(engine, ids) -> tuple[list[StepResult], dict]:
    """Reasoning "Look at<7> the dogs<coord 0.25><coord 0.75><9> then count", answer
    "Two".  Returns the script and the pieces of reasoning text as the model spec cuts them."""
    before, after, answer = text_ids(engine, "Look at"), text_ids(engine, " then count"), text_ids(engine, "Two")
    grounded = [ids["start_ground_points_id"]] + text_ids(engine, " the dogs")
    ground = grounded + [ids["coord_id"], ids["coord_id"]]
    reasoning = ([StepResult(token=t) for t in before + grounded]
                 + [StepResult(token=ids["coord_id"], coord=0.25), StepResult(token=ids["coord_id"], coord=0.75)]
                 + [StepResult(token=t) for t in [ids["end_ground_id"]] + after])
    script = reasoning + [StepResult(token=ids["answer_id"])] + [StepResult(token=t) for t in answer + [ids["eos_id"]]]
    pieces = {"before": engine.decode(before), "ground": engine.decode(ground),
              "after": engine.decode([ids["end_ground_id"]] + after), "n_reasoning": len(reasoning)}
    return script, pieces


def test_size_and_eos_are_suppressed_at_every_reasoning_step_only():
    engine, ids = engine_and_ids()
    script, pieces = grounded_script(engine, ids)
    feeds, output, finish, _ = drive_reasoning_query(engine, script)
    prompt_feed, reasoning_feeds = feeds[0], feeds[1:1 + pieces["n_reasoning"]]
    answer_prefill, answer_feeds = feeds[1 + pieces["n_reasoning"]], feeds[2 + pieces["n_reasoning"]:]
    assert answer_prefill.tokens == [ids["answer_id"]]  # the reasoning ended where the script says
    assert prompt_feed.sample.suppress == ()  # nothing is suppressed at the prefill step
    assert len(reasoning_feeds) == pieces["n_reasoning"]
    for feed in reasoning_feeds:
        assert ids["size_id"] in feed.sample.suppress and ids["eos_id"] in feed.sample.suppress
    # the answer after the reasoning may produce the size token (decoded as nothing)
    assert answer_prefill.sample.suppress == ()
    assert answer_feeds and all(ids["size_id"] not in f.sample.suppress for f in answer_feeds)
    assert output["answer"] == engine.decode(text_ids(engine, "Two")) and finish == "stop"


def test_reasoning_text_is_cut_at_the_ground_tokens():
    engine, ids = engine_and_ids()
    script, pieces = grounded_script(engine, ids)
    _, output, _, chunks = drive_reasoning_query(engine, script)
    # text on both sides of each ground token, so where a cut falls shows in the offsets
    assert pieces["before"].strip() and pieces["ground"].strip() and pieces["after"].strip()
    start = len(pieces["before"])
    assert output["reasoning"] == {
        "text": pieces["before"] + pieces["ground"] + pieces["after"],
        # the grounded chunk runs from the start-ground token up to, not including, the end-ground token
        "grounding": [{"start_idx": start, "end_idx": start + len(pieces["ground"]), "points": [[0.25, 0.75]]}],
    }
    assert "".join(chunks) == output["answer"]  # reasoning is not streamed, only the answer


def test_unstreamed_text_is_decoded_once_and_equals_the_streamed_text():
    """A request nobody streams has its text decoded once at the end (no per-token
    detokenisation): the same answer, reasoning and metrics shape, and no chunks."""
    import json
    import os

    from tests.engine_helpers import CONFORMANCE, fixture_image, fixture_scheduler, request_from_case, run_requests

    compared = 0
    for set_name in ("main", "edge", "edge-reasoning"):
        with open(os.path.join(CONFORMANCE, set_name, "expected.json")) as f:
            cases = [c for c in json.load(f)["cases"] if c["skill"] in ("caption", "query")]
        scheduler = fixture_scheduler(set_name, max_batch=4)
        for case in cases[:4]:
            image = fixture_image(set_name, case["image"]) if case["image"] else None
            streamed, whole = request_from_case(case, image, seed=7), request_from_case(case, image, seed=7)
            whole.stream = False
            out = run_requests(scheduler, [streamed, whole])
            a, b = out[streamed.request_id], out[whole.request_id]
            assert a.error is None and b.error is None
            assert b.output == a.output and b.finish_reason == a.finish_reason, case["args"]
            assert "".join(a.chunks) in (a.output.get("caption"), a.output.get("answer")) and not b.chunks
            assert b.metrics["output_tokens"] == a.metrics["output_tokens"] and b.metrics["ttft_ms"] > 0
            compared += 1
    assert compared >= 10
