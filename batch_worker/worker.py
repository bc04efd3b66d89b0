"""The batch worker's loop: feed the lines of running jobs to the broker, a
bounded number at a time, and write each line's result as it comes.

It is a client of the broker like the front end (a BrokerClient on the
front-end socket), and sends its lines with protocol.BACKGROUND priority; that
is all it does for fairness.  The broker and the GPU worker's scheduler apply
the one priority policy (shared/priority.py): interactive requests are queued
and started first, a quarter of the GPU slots never hold batch lines, and batch
lines yield steps to interactive decodes (BATCH_YIELD_MS).  BATCH_IN_FLIGHT
bounds how many lines are submitted at once.

Each line in flight is waited for on a thread of a small pool (a ReplyStream
blocks); results are written by this loop alone, one transaction per line
(shared/batch_store.py).  Nothing about a line in flight is written down, so
after a crash it is simply pending again and runs once more: idempotent.

Errors that mean "not now" (429 overloaded, 503 broker or GPU worker gone, 504)
put the line back to run again later; a line that keeps losing its GPU worker
or timing out ends as processing_error after MAX_ATTEMPTS.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Optional

from batch_worker import chunking, lines
from api import models
from broker_client.waiting import wait_events
from shared import protocol
from shared.batch_store import CHUNKING, PROCESSING, BatchStore, batch_store_for

log = logging.getLogger("batch_worker")

MAX_CHUNK_ATTEMPTS = 2  # starts of a job's chunking that may end without an answer (the worker died) before it is failed
MAX_ATTEMPTS = 5  # runs of one line that end in worker_died or timeout before it is given up
RETRY_DELAY_S = 1.0  # a line that could not run now waits this long (the broker may be restarting)
HOUSEKEEPING_S = 0.25  # how often new jobs, cancels and expiries are looked for (a new job waits at most this long)
PURGE_EVERY_S = 600.0
POLL_S = 0.2


@dataclasses.dataclass
class LineTask:
    job_id: str
    line_index: int
    offset: int
    length: int
    attempts: int = 0
    not_before: float = 0.0  # monotonic: when a retried line may run again


@dataclasses.dataclass
class Outcome:
    """What became of one run of a line: a result line to write, or a retry (result None)."""

    task: LineTask
    result: Optional[bytes] = None
    ok: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    retry_reason: str = ""
    counts_attempt: bool = False


class BatchWorker:
    def __init__(self, config, client, store: Optional[BatchStore] = None):
        self.config = config
        self.client = client  # a BrokerClient (or anything with its submit API)
        self.store = store or batch_store_for(config)
        self.names = models.ModelNames(config)
        self.in_flight_limit = max(1, config.batch_in_flight)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.in_flight_limit, thread_name_prefix="batch-line")
        # a large file takes seconds to scan: off the loop, so lines in flight keep being recorded meanwhile
        self.chunker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch-chunk")
        self.chunking: dict[str, concurrent.futures.Future] = {}  # job id -> its scan
        self.in_flight: dict[concurrent.futures.Future, LineTask] = {}
        self.retries: list[LineTask] = []
        self.cursors: dict[str, int] = {}  # job id -> last line index handed out this run
        self.queued: list[LineTask] = []
        self.running_jobs: list[str] = []
        self.running_set: frozenset[str] = frozenset()  # read by the pool threads: a line of another job stops
        self.stopping = False
        # set by the chunker when a job's lines are ready: the loop looks at once instead of
        # after its next sleep and housekeeping (up to half a second of a short job's time)
        self.wake = threading.Event()
        self.next_housekeeping = 0.0
        self.next_purge = 0.0

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        log.info("batch worker: data in %s, up to %d lines in flight", self.store.root, self.in_flight_limit)
        try:
            while not self.stopping:
                self.step()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.chunker.shutdown(wait=False, cancel_futures=True)

    def step(self) -> None:
        now = time.monotonic()
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_S
            self.housekeeping(now)
        self.top_up(now)
        if not self.in_flight:
            if self.wake.wait(POLL_S):
                self.wake.clear()
                self.next_housekeeping = 0.0
            return
        done, _ = concurrent.futures.wait(self.in_flight, timeout=POLL_S,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            self.in_flight.pop(future)
            self.record(future.result())

    def housekeeping(self, now: float) -> None:
        if now >= self.next_purge:
            self.next_purge = now + PURGE_EVERY_S
            purged = self.store.purge()
            if purged:
                log.info("purged %d expired jobs", purged)
        for job_id, scan in list(self.chunking.items()):
            if scan.done():
                del self.chunking[job_id]
                scan.result()  # chunk() handles what it expects; anything else is a bug to see
        for job in self.store.jobs_in(CHUNKING):
            if job["id"] not in self.chunking:
                self.chunking[job["id"]] = self.chunker.submit(self.chunk, job["id"])
        self.running_jobs = [job["id"] for job in self.store.jobs_in(PROCESSING)]
        running = self.running_set = frozenset(self.running_jobs)  # a cancelled job's lines in flight stop
        self.queued = [t for t in self.queued if t.job_id in running]
        self.retries = [t for t in self.retries if t.job_id in running]
        self.cursors = {job_id: cursor for job_id, cursor in self.cursors.items() if job_id in running}

    def chunk(self, job_id: str) -> None:
        """Runs on the chunker thread; the store opens a connection per call, so that is safe.
        Whatever reading the file raises fails that job, never the worker; and a file that took
        the worker down anyway (MAX_CHUNK_ATTEMPTS starts without an end) is not read again."""
        started = time.monotonic()
        attempts = self.store.begin_chunking(job_id)
        if attempts > MAX_CHUNK_ATTEMPTS:
            log.warning("job %s: the batch worker stopped %d times while reading its file; failed", job_id, attempts - 1)
            self.store.fail_job(job_id, chunking.VALIDATION_ERROR,
                                f"the batch worker stopped {attempts - 1} times while reading this file")
            return
        try:
            spans = chunking.scan(self.store.input_path(job_id), self.config.batch_max_file_bytes,
                                  self.config.batch_max_lines, self.config.batch_max_line_bytes)
        except chunking.BatchError as ex:
            log.info("job %s failed chunking: %s", job_id, ex.message)
            self.store.fail_job(job_id, ex.code, ex.message)
            return
        except OSError as ex:
            self.store.fail_job(job_id, chunking.VALIDATION_ERROR, f"the input file cannot be read: {ex.strerror}")
            return
        except Exception as ex:  # a bug or a parser surprise: this job's error, not the worker's
            log.exception("job %s: reading its file failed", job_id)
            self.store.fail_job(job_id, chunking.VALIDATION_ERROR, f"the input file cannot be read ({type(ex).__name__})")
            return
        self.store.set_lines(job_id, spans)
        log.info("job %s: %d lines (chunked in %.2f s)", job_id, len(spans), time.monotonic() - started)
        self.wake.set()

    def top_up(self, now: float) -> None:
        """Start lines until BATCH_IN_FLIGHT are in flight.  Retries that are due first, then new lines."""
        while len(self.in_flight) < self.in_flight_limit:
            task = self.next_task(now)
            if task is None:
                return
            future = self.pool.submit(self.run_line, task)
            self.in_flight[future] = task

    def next_task(self, now: float) -> Optional[LineTask]:
        for i, task in enumerate(self.retries):
            if task.not_before <= now:
                return self.retries.pop(i)
        if not self.queued:
            self.queued = self.load_pending()
        return self.queued.pop(0) if self.queued else None

    def load_pending(self, batch: int = 256) -> list[LineTask]:
        """The next pending lines, oldest job first, after those this run has handed out."""
        for job_id in self.running_jobs:
            rows = self.store.pending_lines(job_id, self.cursors.get(job_id, -1), batch)
            if rows:
                self.cursors[job_id] = rows[-1][0]
                return [LineTask(job_id, index, offset, length) for index, offset, length in rows]
        return []

    # ------------------------------------------------------------------ one line (on a pool thread)
    def run_line(self, task: LineTask) -> Outcome:
        try:
            return self._run_line(task)
        except Exception as ex:  # a bug must cost one line, not the loop
            log.exception("line %d of job %s failed", task.line_index, task.job_id)
            return Outcome(task, lines.error_line(task.line_index, None, lines.PROCESSING_ERROR,
                                                  f"internal error ({type(ex).__name__})"))

    def _run_line(self, task: LineTask) -> Outcome:
        if task.length > self.config.batch_max_line_bytes:
            return Outcome(task, lines.error_line(task.line_index, None, lines.INVALID_REQUEST,
                                                  f"the line is longer than {self.config.batch_max_line_bytes} bytes"))
        with open(self.store.input_path(task.job_id), "rb") as f:
            f.seek(task.offset)
            raw = f.read(task.length)
        id_ = lines.line_id(raw)
        try:
            submit, image = lines.to_submit(raw, lines.new_request_id(task.job_id, task.line_index),
                                            self.config, self.names)
        except lines.LineError as ex:
            return Outcome(task, lines.error_line(task.line_index, id_, ex.code, ex.message))
        stream = self.client.submit(submit, image)
        # wait_events cancels the request when its job stops (499) or it outlives its deadline (504).
        job_stopped = lambda: self.stopping or task.job_id not in self.running_set  # noqa: E731
        events = wait_events(stream, submit.deadline, job_stopped)
        final = next(e for e in events if isinstance(e, (protocol.Result, protocol.Error)))
        if isinstance(final, protocol.Error) and final.status == 499:
            if job_stopped():
                return Outcome(task, retry_reason="cancelled")  # its job was cancelled: nothing is written
            # The broker gave up on us (client_gone: it could not reach this worker): not the line's fault.
            return Outcome(task, retry_reason=final.code)
        if isinstance(final, protocol.Result):
            body, tokens_in, tokens_out = lines.ok_line(task.line_index, id_, final)
            return Outcome(task, body, ok=True, input_tokens=tokens_in, output_tokens=tokens_out)
        if final.status in lines.RETRY_STATUSES:
            # Lost GPU worker or timeout: this line may be the cause, so those runs are counted.
            counts = final.code in ("worker_died", "timeout")
            if not counts or task.attempts + 1 < MAX_ATTEMPTS:
                return Outcome(task, retry_reason=final.code, counts_attempt=counts)
        return Outcome(task, lines.error_line(task.line_index, id_, lines.error_code(final), final.message))

    # ------------------------------------------------------------------ results (this loop only)
    def record(self, outcome: Outcome) -> None:
        task = outcome.task
        if outcome.result is None:
            if outcome.retry_reason != "cancelled":
                task.attempts += outcome.counts_attempt
                task.not_before = time.monotonic() + RETRY_DELAY_S
                self.retries.append(task)
                log.info("line %d of job %s runs again (%s)", task.line_index, task.job_id, outcome.retry_reason)
            return
        self.store.record_result(task.job_id, task.line_index, outcome.ok, outcome.result,
                                 outcome.input_tokens, outcome.output_tokens)
