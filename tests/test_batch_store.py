"""The batch job store and chunking on a real SQLite file and real files (no processes)."""
from __future__ import annotations

import dataclasses
import io
import json
import threading

import pytest

from batch_worker import chunking
from batch_worker import worker as batch_worker
from shared import batch_store
from shared.batch_store import BatchStore
from shared.config import Config


@pytest.fixture
def store(tmp_path):
    return BatchStore(tmp_path / "data")


def upload(store: BatchStore, data: bytes, parts: int = 1) -> dict:
    file_id, upload_id = store.create_upload()
    size = -(-len(data) // parts) or 1
    listed = []
    for n in range(parts):
        listed.append((n + 1, store.put_part(file_id, upload_id, n + 1, io.BytesIO(data[n * size:(n + 1) * size]), 1 << 30)))
    return store.complete_upload(file_id, upload_id, listed)


def scan(store: BatchStore, job: dict, max_file=1 << 30, max_lines=1000, max_line=1000):
    return chunking.scan(store.input_path(job["id"]), max_file, max_lines, max_line)


def test_parts_are_joined_in_order_and_the_job_starts_chunking(store):
    data = b"".join(json.dumps({"skill": "caption", "n": i}).encode() + b"\n" for i in range(50))
    job = upload(store, data, parts=3)
    assert job["status"] == batch_store.CHUNKING
    assert store.input_path(job["id"]).read_bytes() == data
    spans = scan(store, job)
    assert [json.loads(data[o:o + n])["n"] for o, n in spans] == list(range(50))


@pytest.mark.parametrize("data, code", [
    (b'{"skill": "caption"}\n\n{"skill": "caption"}\n', "validation_error"),  # blank line
    (b'{"skill": "caption", "id": "\xff\xfe"}\n', "validation_error"),  # not UTF-8
    (b'{"skill": "caption"\n', "validation_error"),  # not JSON
    (b'[1, 2]\n', "validation_error"),  # not an object
    (b"", "empty_batch"),
    (b'{"a": 1}\n' * 11, "limit_exceeded"),  # more lines than allowed (10)
])
def test_malformed_files_get_their_batch_level_error(store, data, code):
    job = upload(store, data)
    with pytest.raises(chunking.BatchError) as err:
        scan(store, job, max_lines=10)
    assert err.value.code == code


def test_an_oversized_line_is_marked_not_read_and_the_others_are_kept(store):
    big = json.dumps({"skill": "caption", "pad": "x" * 5000}).encode()
    data = b'{"a": 1}\n' + big + b'\n{"b": 2}\r\n' + big  # the last line has no newline
    spans = scan(store, upload(store, data), max_line=1000)
    assert len(spans) == 4
    assert spans[0] == (0, 8) and spans[2][1] == 8
    assert spans[1][1] > 1000 and spans[3][1] > 1000
    assert data[spans[2][0]:spans[2][0] + spans[2][1]] == b'{"b": 2}'


def test_each_line_gets_exactly_one_result_and_the_job_completes(store):
    job = upload(store, b'{"a": 1}\n{"a": 2}\n')
    store.set_lines(job["id"], scan(store, job))
    assert store.record_result(job["id"], 0, True, b'{"line_index": 0}', 10, 2)
    assert not store.record_result(job["id"], 0, False, b'{"line_index": 0, "again": true}')  # a rerun's answer
    assert store.get_job(job["id"])["status"] == batch_store.PROCESSING
    assert store.record_result(job["id"], 1, False, b'{"line_index": 1}')
    done = store.get_job(job["id"])
    assert (done["status"], done["completed"], done["failed"], done["input_tokens"]) == ("completed", 1, 1, 10)
    assert list(store.results(job["id"], 0, 2)) == [b'{"line_index": 0}\n', b'{"line_index": 1}\n']


def test_cancelled_job_takes_no_more_results(store):
    job = upload(store, b'{"a": 1}\n{"a": 2}\n')
    store.set_lines(job["id"], scan(store, job))
    assert store.cancel_job(job["id"])["status"] == "cancelled"
    assert not store.record_result(job["id"], 0, True, b"{}")


def test_upload_refusals(store):
    file_id, upload_id = store.create_upload()
    etag = store.put_part(file_id, upload_id, 1, io.BytesIO(b"x" * 60), 100)
    with pytest.raises(batch_store.UploadError) as err:  # 60 + 50 > 100
        store.put_part(file_id, upload_id, 2, io.BytesIO(b"y" * 50), 100)
    assert (err.value.status, err.value.code) == (413, "limit_exceeded")
    with pytest.raises(batch_store.UploadError):  # wrong etag
        store.complete_upload(file_id, upload_id, [(1, "0" * 32)])
    with pytest.raises(batch_store.UploadError):  # a part never uploaded
        store.complete_upload(file_id, upload_id, [(1, etag), (2, etag)])
    with pytest.raises(batch_store.NotFound):
        store.put_part(file_id, "f" * 32, 1, io.BytesIO(b"z"), 100)
    with pytest.raises(batch_store.NotFound):  # ids are checked before they touch a path
        store.get_job("../../etc/passwd")
    store.abort_upload(file_id, upload_id)
    with pytest.raises(batch_store.NotFound):
        store.complete_upload(file_id, upload_id, [(1, etag)])


def test_purge_removes_expired_jobs_and_their_files(store):
    job = upload(store, b'{"a": 1}\n')
    store.set_lines(job["id"], scan(store, job))
    store.record_result(job["id"], 0, True, b"{}")
    assert store.purge(now=store.get_job(job["id"])["expires_at"] - 1) == 0
    assert store.purge(now=store.get_job(job["id"])["expires_at"] + 1) == 1
    assert not store.input_path(job["id"]).exists()
    with pytest.raises(batch_store.NotFound):
        store.get_job(job["id"])


def test_a_long_scan_does_not_hold_up_the_batch_workers_loop(store, monkeypatch):
    """Scanning a large file takes seconds; it runs on its own thread, so the loop goes on
    recording the lines in flight.  FakeSlowScan stands in for a slow disk (fault injection)."""
    release = threading.Event()
    real_scan = chunking.scan

    def fake_slow_scan(*args):
        assert release.wait(30)
        return real_scan(*args)

    monkeypatch.setattr(chunking, "scan", fake_slow_scan)
    config = dataclasses.replace(Config(), batch_data_dir=str(store.root))
    loop = batch_worker.BatchWorker(config, client=None, store=store)
    try:
        job = upload(store, b'{"skill": "caption"}\n' * 3)
        loop.housekeeping(0.0)  # returns with the scan still waiting
        assert store.get_job(job["id"])["status"] == batch_store.CHUNKING and job["id"] in loop.chunking
        loop.housekeeping(0.0)  # a job being scanned is not scanned twice
        assert len(loop.chunking) == 1
        release.set()
        loop.chunking[job["id"]].result(timeout=30)
        loop.housekeeping(0.0)
        assert store.get_job(job["id"])["status"] == batch_store.PROCESSING and not loop.chunking
        assert loop.running_jobs == [job["id"]]
    finally:
        release.set()
        loop.chunker.shutdown(wait=True)
        loop.pool.shutdown(wait=True)
