"""Fine-tuned variants in the engine: mixed batches, the image cache, the adapter store,
bad ids and bad files, and downloads (from a local HTTP server on 127.0.0.1).

The reference's own numbers for the variants are checked in test_conformance.py
(set `variants`); these tests pin what the fixtures cannot: batching, caching,
memory bounds and refusals."""
from __future__ import annotations

import http.server
import os
import shutil
import threading
import uuid
from pathlib import Path

import pytest
import torch

from gpu_worker.engine_types import EngineRequest
from gpu_worker.scheduler import Scheduler
from gpu_worker import variants
from gpu_worker.variants import BadVariantId, VariantNotFound, check_variant_id
from tests.engine_helpers import KV_LAYOUT_IDS, KV_LAYOUTS, VARIANTS_DIR, assert_pool_holds_only_cached_images, fixture_engine, fixture_image, run_requests, sampling, skill_params, variant_store

ALPHA, BETA = "ft-alpha@100", "ft-beta@7"
IMAGES = ["small_96x64.png", "landscape_800x600.png", "photo_773x767.jpg"]


def request(skill, params, variant=None, image=IMAGES[0], max_tokens=16, **settings):
    settings = {"temperature": 0, "max_tokens": max_tokens, **settings}
    img = fixture_image("variants", image) if image else None
    return EngineRequest(uuid.uuid4().hex, skill, skill_params(skill, params), sampling(settings), img, seed=5,
                         variant=variant)


def mixed_requests():
    """Base rows and rows of both variants, every skill, on shared and distinct images."""
    reqs = []
    for i, variant in enumerate([None, ALPHA, BETA, None, ALPHA, BETA]):
        image = IMAGES[i % 3]
        reqs.append(request("caption", {"length": "normal"}, variant, image, max_tokens=12 + i))
        reqs.append(request("query", {"question": "What is in the image?"}, variant, IMAGES[0], max_tokens=10))
    reqs.append(request("query", {"question": "How many?", "reasoning": True}, ALPHA, IMAGES[1], max_tokens=9))
    reqs.append(request("query", {"question": "Hello"}, BETA, None, max_tokens=7))
    reqs.append(request("query", {"question": "Hello"}, None, None, max_tokens=7))
    reqs.append(request("detect", {"object": "cat"}, ALPHA, IMAGES[2], max_objects=3))
    reqs.append(request("point", {"object": "red sofa"}, BETA, IMAGES[2], max_objects=3))
    reqs.append(request("caption", {"length": "short"}, None, IMAGES[2], max_tokens=10, temperature=0.8, top_p=0.9))
    reqs.append(request("caption", {"length": "short"}, BETA, IMAGES[2], max_tokens=10, temperature=0.8, top_p=0.9))
    return reqs


def clone(req):
    return EngineRequest(uuid.uuid4().hex, req.skill, req.params, req.settings, req.image, req.seed,
                         variant=req.variant)


def summary(outcome):
    return outcome.output, outcome.finish_reason, outcome.chunks, outcome.error


def new_scheduler(**kwargs):
    engine = fixture_engine("variants")
    return Scheduler(engine, variants=variant_store(engine), **kwargs)


@pytest.fixture(scope="module")
def serial_answers():
    # one row at a time; one scheduler, so each (image, variant) is encoded once (its cache
    # gives the same prefix as a fresh encode: test_conformance checks cached answers too)
    reqs = mixed_requests()
    outcomes = run_requests(new_scheduler(max_batch=1), reqs)
    answers = [summary(outcomes[req.request_id]) for req in reqs]
    assert all(a[3] is None for a in answers)
    return answers


def test_variants_change_answers(serial_answers):
    """The adapters act: the same request under base, alpha and beta differ."""
    base, alpha, beta = (serial_answers[i][0] for i in (0, 2, 4))  # first three captions: base, alpha, beta
    assert len({str(base), str(alpha), str(beta)}) == 3


@pytest.mark.parametrize("block_size,attention", KV_LAYOUTS[:2], ids=KV_LAYOUT_IDS[:2])  # the odd block size: rows joining below
def test_mixed_batch_equals_serial(serial_answers, block_size, attention):
    sched = new_scheduler(max_batch=32, block_size=block_size, attention=attention)
    reqs = [clone(r) for r in mixed_requests()]
    for r in reqs:
        sched.add(r)
    biggest = 0
    outcomes = {}
    chunks = {r.request_id: [] for r in reqs}
    while sched.has_work():
        for ev in sched.step():
            collect(ev, chunks, outcomes)
        biggest = max(biggest, sched.counters["last_batch"])
    assert biggest >= 10  # base and both variants' rows really decoded in one forward
    assert [outcomes[r.request_id] for r in reqs] == serial_answers


@pytest.mark.parametrize("block_size,attention", KV_LAYOUTS, ids=KV_LAYOUT_IDS)
def test_rows_joining_mid_run_equal_serial(serial_answers, block_size, attention):
    sched = new_scheduler(max_batch=5, block_size=block_size, attention=attention)  # rows < requests: all join mid-run
    reqs = [clone(r) for r in mixed_requests()]
    pending = list(reqs)
    outcomes, chunks = {}, {r.request_id: [] for r in reqs}
    step = 0
    while pending or sched.has_work():
        if pending and step % 2 == 0:
            sched.add(pending.pop(0))
        for ev in sched.step():
            collect(ev, chunks, outcomes)
        step += 1
    assert [outcomes[r.request_id] for r in reqs] == serial_answers


def collect(ev, chunks, outcomes):
    if hasattr(ev, "text"):
        chunks[ev.request_id].append(ev.text)
    elif hasattr(ev, "output"):
        outcomes[ev.request_id] = (ev.output, ev.finish_reason, chunks[ev.request_id], None)
    else:
        outcomes[ev.request_id] = (None, None, chunks[ev.request_id], ev.message)


def test_image_cache_is_per_variant():
    sched = new_scheduler(max_batch=4)
    questions = ["What is in the image?", "How many people are there?", "Describe it."]
    first = [request("query", {"question": q}, ALPHA) for q in questions]
    for r in first:  # one after another: the second and third find the first's encoding
        run_requests(sched, [r])
    assert sched.counters["image_encodes"] == 1
    # the same image for the base model and for beta: their own prefixes, not alpha's
    base = request("query", {"question": questions[0]})
    beta = request("query", {"question": questions[0]}, BETA)
    got = run_requests(sched, [base, beta])
    assert sched.counters["image_encodes"] == 3
    for req in (base, beta):
        alone = run_requests(new_scheduler(max_batch=1), [clone(req)])
        assert summary(got[req.request_id]) == summary(next(iter(alone.values())))


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "/etc/passwd", "a\\b", "a\x00b", ".hidden", "x" * 200,
                                 "", "ft..alpha", "ft alpha"])
def test_ids_that_could_escape_are_refused(bad):
    with pytest.raises(BadVariantId) as err:
        check_variant_id(bad)
    assert err.value.status == 400
    sched = new_scheduler(max_batch=2)
    with pytest.raises(BadVariantId):
        sched.add(request("caption", {"length": "short"}, bad))


def test_id_pointing_outside_the_directory_never_loads(tmp_path):
    """A valid adapter one level above the variant directory cannot be reached."""
    inner = tmp_path / "variants"
    inner.mkdir()
    (tmp_path / "outside").mkdir()
    shutil.copy(Path(VARIANTS_DIR) / BETA / "final.pt", tmp_path / "outside" / "final.pt")
    engine = fixture_engine("variants")
    sched = Scheduler(engine, variants=variant_store(engine, str(inner)))
    with pytest.raises(BadVariantId):
        sched.add(request("caption", {"length": "short"}, "../outside"))
    assert not sched.variants.loaded


def test_unknown_variant_is_404_before_any_work():
    sched = new_scheduler(max_batch=2)
    with pytest.raises(VariantNotFound) as err:
        sched.add(request("caption", {"length": "short"}, "ft-nope@1"))
    assert err.value.status == 404 and "ft-nope@1" in str(err.value)
    assert not sched.has_work()
    no_store = Scheduler(fixture_engine("variants"), max_batch=2)
    with pytest.raises(VariantNotFound):
        no_store.add(request("caption", {"length": "short"}, ALPHA))


class CodeInPickle:
    """Pickles as a call to os.getcwd: weights_only loading must refuse it, not run it."""

    def __reduce__(self):
        return (os.getcwd, ())


def write_bad_variants(directory: Path) -> dict[str, str]:
    """Variant id -> a word the 422 message must contain."""
    good = torch.load(Path(VARIANTS_DIR) / BETA / "final.pt", weights_only=True)
    cases = {
        "not-a-dict": ([torch.zeros(2)], "state dict"),
        "wrong-shape": ({**good, "text.blocks.0.attn.qkv.A": torch.zeros(8, 7)}, "text.blocks.0.attn.qkv"),
        "missing-block": ({k: v for k, v in good.items() if not k.startswith("text.blocks.2.")}, "missing"),
        "extra-block": ({**good, "text.blocks.9.mlp.fc1.A": torch.zeros(8, 128)}, "unexpected"),
        "code-in-pickle": ({"text.blocks.0.attn.qkv.A": CodeInPickle()}, "weights-only"),
        "nan-values": ({**good, "text.blocks.1.mlp.fc2.B": torch.full((128, 8), float("nan"))}, "NaN"),
    }
    for name, (state, _) in cases.items():
        (directory / name).mkdir(parents=True)
        torch.save(state, directory / name / "final.pt")
    (directory / "garbage").mkdir()
    (directory / "garbage" / "final.pt").write_bytes(b"\x00not a torch file" * 10)
    words = {name: word for name, (_, word) in cases.items()}
    words["garbage"] = "weights-only"
    return words


def test_malformed_files_are_422_and_others_keep_being_served(tmp_path):
    words = write_bad_variants(tmp_path)
    engine = fixture_engine("variants")
    sched = Scheduler(engine, max_batch=8, variants=variant_store(engine, str(tmp_path)))
    bad = {name: request("caption", {"length": "short"}, name) for name in words}
    good = request("caption", {"length": "short"}, max_tokens=6)
    outcomes = run_requests(sched, list(bad.values()) + [good])
    for name, req in bad.items():
        out = outcomes[req.request_id]
        assert out.output is None and words[name] in out.error, (name, out.error)
    assert outcomes[good.request_id].error is None and outcomes[good.request_id].output["caption"]
    assert not sched.running and sched.free_rows() == sched.max_batch
    assert_pool_holds_only_cached_images(sched)


def test_bad_file_status_and_code(tmp_path):
    write_bad_variants(tmp_path)
    engine = fixture_engine("variants")
    sched = Scheduler(engine, max_batch=2, variants=variant_store(engine, str(tmp_path)))
    sched.add(request("caption", {"length": "short"}, "wrong-shape"))
    failed = []
    while sched.has_work():  # the file is read off the scheduler's thread; its error comes back in a step
        failed += [ev for ev in sched.step() if hasattr(ev, "status")]
    assert [(ev.status, ev.code) for ev in failed] == [(422, "invalid_variant")]


def test_an_adapter_loads_off_the_scheduler_thread(monkeypatch):
    """Steps keep running while a variant's file is read: the request waits, not the batch."""
    engine = fixture_engine("variants")
    store = variant_store(engine)
    sched = Scheduler(engine, max_batch=2, variants=store)
    release = threading.Event()
    real_load = store._load

    def slow_load(variant):  # fault injection: a slow disk
        release.wait(30)
        return real_load(variant)

    monkeypatch.setattr(store, "_load", slow_load)
    base = request("caption", {"length": "short"}, None, max_tokens=4)
    tuned = request("caption", {"length": "short"}, ALPHA, max_tokens=4)
    sched.add(tuned)
    sched.add(base)
    outcomes, chunks = {}, {base.request_id: [], tuned.request_id: []}
    while base.request_id not in outcomes:  # the base request finishes while ALPHA is still loading
        for ev in sched.step():
            collect(ev, chunks, outcomes)
    assert tuned.request_id not in outcomes and store.status(ALPHA) == "loading"
    release.set()
    while sched.has_work():
        for ev in sched.step():
            collect(ev, chunks, outcomes)
    assert outcomes[tuned.request_id][3] is None and outcomes[tuned.request_id][0]["caption"]
    assert list(store.loaded) == [ALPHA]


def test_lru_eviction_never_touches_a_running_request():
    engine = fixture_engine("variants")
    sched = Scheduler(engine, max_batch=4, variants=variant_store(engine, max_count=1))
    alpha = request("caption", {"length": "normal"}, ALPHA, max_tokens=20)
    expected = summary(next(iter(run_requests(new_scheduler(max_batch=1), [clone(alpha)]).values())))
    sched.add(alpha)
    outcomes, chunks = {}, {alpha.request_id: []}
    running_steps = 0  # alpha's adapter loads off the scheduler's thread first
    while running_steps < 3:
        for ev in sched.step():
            collect(ev, chunks, outcomes)
        running_steps += alpha.request_id in sched.running
    beta = request("caption", {"length": "short"}, BETA, max_tokens=6)
    chunks[beta.request_id] = []
    sched.add(beta)  # loading beta evicts alpha from the store while alpha is mid-answer
    while sched.has_work():
        for ev in sched.step():
            collect(ev, chunks, outcomes)
    assert list(sched.variants.loaded) == [BETA] and sched.variants.evictions == 1
    assert outcomes[alpha.request_id] == expected


def test_bytes_bound_keeps_store_small():
    engine = fixture_engine("variants")
    store = variant_store(engine, max_bytes=1)  # smaller than any adapter: only the newest stays
    store.get(ALPHA)
    store.get(BETA)
    assert list(store.loaded) == [BETA] and store.bytes == store.loaded[BETA].bytes()


class VariantServer(http.server.BaseHTTPRequestHandler):
    """Stands in for Moondream's variant endpoint on 127.0.0.1."""

    files: dict = {}
    seen_keys: list = []

    def do_GET(self):
        self.seen_keys.append(self.headers.get("X-Moondream-Auth"))
        prefix, suffix = "/v1/variants/", "/download"
        variant = self.path[len(prefix):-len(suffix)] if self.path.startswith(prefix) and self.path.endswith(suffix) else ""
        body = self.files.get(variant)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def variant_server():
    VariantServer.files = {BETA: (Path(VARIANTS_DIR) / BETA / "final.pt").read_bytes(), "huge": b"x" * 4096}
    VariantServer.seen_keys = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), VariantServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_missing_variant_downloaded_when_enabled(tmp_path, variant_server):
    engine = fixture_engine("variants")
    store = variant_store(engine, str(tmp_path), download_url=variant_server, download_key="k-123",
                          file_max_bytes=1 << 20, download_timeout=5)
    sched = Scheduler(engine, max_batch=4, variants=store)
    beta = request("caption", {"length": "short"}, BETA, max_tokens=8)
    base = request("caption", {"length": "short"}, max_tokens=8)
    got = run_requests(sched, [beta, base])  # the base request does not wait for the download
    expected = summary(next(iter(run_requests(new_scheduler(max_batch=1), [clone(beta)]).values())))
    assert summary(got[beta.request_id]) == expected
    assert got[base.request_id].error is None
    assert (tmp_path / BETA / "final.pt").is_file() and VariantServer.seen_keys == ["k-123"]
    assert not [p for p in tmp_path.rglob("*.part")]


def test_failed_downloads_fail_their_requests(tmp_path, variant_server):
    engine = fixture_engine("variants")
    store = variant_store(engine, str(tmp_path), download_url=variant_server, file_max_bytes=1024, download_timeout=5)
    sched = Scheduler(engine, max_batch=4, variants=store)
    missing = request("caption", {"length": "short"}, "ft-absent@3")
    huge = request("caption", {"length": "short"}, "huge")
    got = run_requests(sched, [missing, huge])
    assert "HTTP 404" in got[missing.request_id].error
    assert "VARIANT_MAX_MB" in got[huge.request_id].error
    assert not (tmp_path / "huge" / "final.pt").exists()


def test_download_off_by_default(tmp_path):
    """Without a download URL a missing variant is a 404 at once: nothing is fetched."""
    engine = fixture_engine("variants")
    sched = Scheduler(engine, variants=variant_store(engine, str(tmp_path)))
    with pytest.raises(VariantNotFound):
        sched.add(request("caption", {"length": "short"}, BETA))


def test_loading_a_variant_does_not_hold_up_running_requests():
    """The adapter loads off the scheduler's thread; the step after the request arrives
    still advances every running sequence."""
    sched = new_scheduler(max_batch=4)
    running = request("caption", {"length": "normal"}, max_tokens=20)
    sched.add(running)
    for _ in range(3):
        sched.step()
    seq = sched.running[running.request_id]
    before = seq.ctx.position
    sched.add(request("caption", {"length": "short"}, ALPHA, max_tokens=4))
    assert not sched.variants.loaded
    sched.step()  # alpha loads elsewhere; the running sequence decodes
    assert seq.ctx.position == before + 1
    while sched.has_work():
        sched.step()
    assert list(sched.variants.loaded) == [ALPHA]


def test_a_failed_download_is_remembered_and_downloads_are_bounded(tmp_path, variant_server):
    """200 requests for one unknown id made 48 outbound calls with the operator's key."""
    engine = fixture_engine("variants")
    store = variant_store(engine, str(tmp_path), download_url=variant_server, download_key="k", download_timeout=5)
    sched = Scheduler(engine, max_batch=4, variants=store)
    first = run_requests(sched, [request("caption", {"length": "short"}, "ft-absent@3")])
    assert "HTTP 404" in next(iter(first.values())).error
    for _ in range(20):  # remembered: the same answer at once, no new call
        with pytest.raises(VariantNotFound, match="HTTP 404"):
            sched.add(request("caption", {"length": "short"}, "ft-absent@3"))
    assert len(VariantServer.seen_keys) == 1
    for n in range(variants.MAX_DOWNLOADS):
        assert store.status(f"ft-other{n}@1") == "fetching"
    with pytest.raises(variants.DownloadsBusy):
        store.status("ft-one-too-many@1")


def test_a_downloaded_file_that_cannot_load_is_never_listed(tmp_path, variant_server):
    engine = fixture_engine("variants")
    VariantServer.files["ft-broken@1"] = b"not a state dict"
    store = variant_store(engine, str(tmp_path), download_url=variant_server, download_timeout=5)
    sched = Scheduler(engine, max_batch=4, variants=store)
    got = run_requests(sched, [request("caption", {"length": "short"}, "ft-broken@1")])
    assert "not a loadable weights-only state dict" in next(iter(got.values())).error
    assert store.available(max_age=0) == [] and not list(tmp_path.rglob("*.part"))


def test_not_found_names_no_server_path(tmp_path):
    engine = fixture_engine("variants")
    store = variant_store(engine, str(tmp_path))
    with pytest.raises(VariantNotFound) as err:
        store.status("ft-absent@3")
    assert str(tmp_path) not in str(err.value) and "final.pt" not in str(err.value)
