"""The batch job store and chunking on a real SQLite file and real files (no processes)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sqlite3
import stat
import threading

import pytest

from batch_worker import chunking
from batch_worker import worker as batch_worker
from shared import batch_store, protocol
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
    (b'{"skill": "caption"}\n\n{"skill": "caption"}\n', "validation_error"),  # blank line before another
    (b'\n\n', "empty_batch"),  # blank lines only
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


def test_a_deeply_nested_line_fails_its_job_not_the_worker(store):
    """2,000 nested brackets made the decoder raise RecursionError, which escaped the line check."""
    data = b'{"skill": "caption"}\n{"id": ' + b"[" * 2000 + b"]" * 2000 + b"}\n"
    job = upload(store, data)
    with pytest.raises(chunking.BatchError) as err:
        scan(store, job, max_line=10_000)
    assert err.value.code == "validation_error" and "line 2 is nested too deeply" in err.value.message


def test_a_bom_and_blank_lines_at_the_end_are_accepted(store):
    data = b'\xef\xbb\xbf{"n": 0}\r\n{"n": 1}\n\n  \r\n'
    spans = scan(store, upload(store, data))
    assert [json.loads(data[o:o + n])["n"] for o, n in spans] == [0, 1]
    with pytest.raises(chunking.BatchError) as err:  # a blank line between lines is named
        scan(store, upload(store, b'{"n": 0}\n\n \n{"n": 1}\n'))
    assert "line 2 is blank" in err.value.message


def test_a_job_that_took_the_worker_down_twice_is_failed_not_read_again(store):
    config = dataclasses.replace(Config(), batch_data_dir=str(store.root))
    job = upload(store, b'{"skill": "caption"}\n')
    for _ in range(batch_worker.MAX_CHUNK_ATTEMPTS):  # two starts that never finished (the worker died)
        store.begin_chunking(job["id"])
    loop = batch_worker.BatchWorker(config, client=None, store=store)
    try:
        loop.chunk(job["id"])
    finally:
        loop.chunker.shutdown(wait=True)
        loop.pool.shutdown(wait=True)
    failed = store.get_job(job["id"])
    assert failed["status"] == "failed" and "stopped 2 times while reading this file" in failed["error_message"]


def test_an_unexpected_error_while_chunking_fails_that_job_only(store, monkeypatch):
    """FakeBrokenScan raises what no check expects (fault injection): the job fails with the
    error's name and the worker's loop goes on."""
    def fake_broken_scan(*args):
        raise MemoryError("injected")

    monkeypatch.setattr(chunking, "scan", fake_broken_scan)
    config = dataclasses.replace(Config(), batch_data_dir=str(store.root))
    loop = batch_worker.BatchWorker(config, client=None, store=store)
    try:
        job = upload(store, b'{"skill": "caption"}\n')
        loop.housekeeping(0.0)
        loop.chunking[job["id"]].result(timeout=30)
        loop.housekeeping(0.0)  # raised here before: the worker exited
        failed = store.get_job(job["id"])
        assert failed["status"] == "failed" and "(MemoryError)" in failed["error_message"]
    finally:
        loop.chunker.shutdown(wait=True)
        loop.pool.shutdown(wait=True)


class BodyThatWaits(io.BytesIO):
    """A part's body whose first read waits until every parallel part has started (so the
    parts' size checks all run before any of them has written: the race, every time)."""

    def __init__(self, data: bytes, barrier: threading.Barrier):
        super().__init__(data)
        self.barrier = barrier

    def read(self, size=-1):
        if self.tell() == 0:
            self.barrier.wait(10)
        return super().read(size)


def test_parallel_parts_cannot_pass_the_size_check_together(store):
    file_id, upload_id = store.create_upload()
    barrier = threading.Barrier(3)
    outcomes = []

    def put(number: int) -> None:
        try:
            store.put_part(file_id, upload_id, number, BodyThatWaits(b"x" * 60, barrier), 100)
            outcomes.append("stored")
        except batch_store.UploadError as ex:
            outcomes.append(ex.code)

    threads = [threading.Thread(target=put, args=(n,)) for n in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["limit_exceeded", "limit_exceeded", "stored"]
    assert sum(p.stat().st_size for p in (store.uploads_dir / file_id).iterdir()) == 60


def test_quotas_on_open_uploads_and_stored_bytes(tmp_path):
    store = BatchStore(tmp_path / "data", max_open_uploads=2, max_stored_bytes=150)
    first, second = store.create_upload(), store.create_upload()
    with pytest.raises(batch_store.UploadError) as err:
        store.create_upload()
    assert (err.value.status, err.value.code) == (429, "quota_exceeded") and "BATCH_MAX_OPEN_UPLOADS" in err.value.message
    etag = store.put_part(*first, 1, io.BytesIO(b"a" * 100), 1000)
    with pytest.raises(batch_store.UploadError) as err:  # 100 + 60 > 150, in another upload
        store.put_part(*second, 1, io.BytesIO(b"b" * 60), 1000)
    assert (err.value.status, err.value.code) == (429, "quota_exceeded") and "BATCH_MAX_STORED_BYTES" in err.value.message
    job = store.complete_upload(*first, [(1, etag)])  # the bytes are the job's now; an upload slot is free
    store.create_upload()
    with pytest.raises(batch_store.UploadError):
        store.put_part(*second, 1, io.BytesIO(b"b" * 60), 1000)
    store.cancel_job(job["id"])
    store.purge(now=store.get_job(job["id"])["expires_at"] + 1)  # expired (and the uploads too): room again
    store.put_part(*store.create_upload(), 1, io.BytesIO(b"b" * 150), 1000)


def test_the_store_is_its_owners_only_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        store = BatchStore(tmp_path / "data")
        job = upload(store, b'{"skill": "caption"}\n', parts=1)
        store.create_upload()
    finally:
        os.umask(old)
    for path in [store.root, *store.root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    assert store.input_path(job["id"]).exists()


def test_a_store_from_before_the_quotas_gets_their_columns(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    conn = sqlite3.connect(root / "batch.sqlite3")
    conn.executescript(batch_store.SCHEMA.replace(",\n    input_bytes INTEGER NOT NULL DEFAULT 0, chunk_attempts INTEGER NOT NULL DEFAULT 0", ""))
    conn.execute("INSERT INTO jobs (id, status, created_at, expires_at) VALUES (?, 'chunking', 0, 0)", ("a" * 32,))
    conn.commit()
    conn.close()
    store = BatchStore(root)
    assert store.begin_chunking("a" * 32) == 1 and store.get_job("a" * 32)["input_bytes"] == 0


def test_a_part_whose_upload_is_aborted_meanwhile_is_not_found(store):
    """The abort removed the folder while the part was still arriving: a 404, not a 500."""
    file_id, upload_id = store.create_upload()

    class BodyAbortedMidway(io.BytesIO):  # the abort lands between the checks and the write
        def read(self, size=-1):
            if self.tell() == 0:
                store.abort_upload(file_id, upload_id)
            return super().read(size)

    with pytest.raises(batch_store.NotFound):
        store.put_part(file_id, upload_id, 1, BodyAbortedMidway(b"x" * 10), 100)


class FakeCrashBeforeInsert(BatchStore):
    """Injects the fault: the process dies after the input file's rename, before the job's INSERT."""

    def write(self):
        if getattr(self, "crash_next_write", False):
            raise SystemExit("killed")
        return super().write()


def test_a_file_left_by_a_crash_between_rename_and_insert_is_purged(tmp_path):
    store = FakeCrashBeforeInsert(tmp_path / "data")
    kept = upload(store, b'{"a": 1}\n')  # a live job: its file stays
    file_id, upload_id = store.create_upload()
    etag = store.put_part(file_id, upload_id, 1, io.BytesIO(b'{"b": 2}\n'), 1 << 30)
    store.crash_next_write = True
    with pytest.raises(SystemExit):
        store.complete_upload(file_id, upload_id, [(1, etag)])
    store.crash_next_write = False
    left = [p for p in store.files_dir.glob("*.jsonl") if p != store.input_path(kept["id"])]
    assert len(left) == 1  # renamed into place, owned by no job
    store.purge()
    assert left[0].exists()  # young: it may be a completion between its rename and INSERT right now
    store.purge(now=left[0].stat().st_mtime + batch_store.TMP_FILE_AGE_S + 1)
    assert not left[0].exists() and store.input_path(kept["id"]).exists()


class WriteSizes(BatchStore):
    """The real store, noting how many rows each write transaction changed."""

    def __init__(self, *args):
        super().__init__(*args)
        self.changed: list[int] = []

    @contextlib.contextmanager
    def write(self):
        with super().write() as conn:
            before = conn.total_changes
            yield conn
            self.changed.append(conn.total_changes - before)


def test_purge_deletes_lines_in_bounded_write_transactions(tmp_path):
    store = WriteSizes(tmp_path / "data")
    jobs = [upload(store, b"".join(b'{"a": %d}\n' % i for i in range(7))) for _ in range(2)]
    for job in jobs:
        store.set_lines(job["id"], scan(store, job))
        store.cancel_job(job["id"])
    store.purge_lines_per_write = 3
    store.changed.clear()
    assert store.purge(now=max(store.get_job(j["id"])["expires_at"] for j in jobs) + 1) == 2
    # 14 lines and 2 job rows, never more than 3 lines (and the job's row) in one transaction
    assert sum(store.changed) == 16 and max(store.changed) <= 4, store.changed
    assert not any(store.input_path(j["id"]).exists() for j in jobs)


class FakeClientGoneBroker:
    """Injects the fault: the broker answers the first request 499 client_gone (it could not reach
    this worker for a moment), as broker.py does for a client it lost."""

    def __init__(self):
        self.submitted = []

    def submit(self, msg, image=None):
        self.submitted.append(msg)
        return FakeReplyStream(msg.request_id, protocol.Error(msg.request_id, 499, "client_gone", "front end unreachable"))


class FakeReplyStream:
    def __init__(self, request_id, *events):
        self.request_id, self.events = request_id, list(events)

    def next_event(self, timeout):
        return self.events.pop(0)

    def cancel(self):
        pass


def test_a_499_from_the_broker_runs_the_line_again(store):
    config = dataclasses.replace(Config(), batch_data_dir=str(store.root))
    loop = batch_worker.BatchWorker(config, client=FakeClientGoneBroker(), store=store)
    try:
        job = upload(store, b'{"skill": "query", "question": "hi"}\n')
        store.set_lines(job["id"], scan(store, job))
        loop.housekeeping(0.0)
        task = loop.next_task(0.0)
        loop.record(loop.run_line(task))
        assert loop.retries == [task]  # not stranded: it runs again after RETRY_DELAY_S
        assert store.get_job(job["id"])["status"] == batch_store.PROCESSING
    finally:
        loop.chunker.shutdown(wait=True)
        loop.pool.shutdown(wait=True)


def test_the_cursors_of_ended_jobs_are_dropped(store):
    config = dataclasses.replace(Config(), batch_data_dir=str(store.root))
    loop = batch_worker.BatchWorker(config, client=None, store=store)
    try:
        jobs = [upload(store, b'{"skill": "query", "question": "hi"}\n') for _ in range(2)]
        for job in jobs:
            store.set_lines(job["id"], scan(store, job))
        loop.housekeeping(0.0)
        assert loop.load_pending() and loop.cursors == {jobs[0]["id"]: 0}
        store.cancel_job(jobs[0]["id"])
        loop.housekeeping(0.0)
        assert loop.load_pending() and loop.cursors == {jobs[1]["id"]: 0}  # the ended job's cursor is gone
    finally:
        loop.chunker.shutdown(wait=True)
        loop.pool.shutdown(wait=True)
