"""The durable store of bulk jobs (the Batch API): SQLite in WAL mode, files beside it.

Shared by the front end (uploads, status, downloads, cancel) and the batch
worker (chunking, results, purging).  Layout under BATCH_DATA_DIR:

    batch.sqlite3            jobs, their lines and each line's result
    uploads/<fileId>/<N>     the parts of an upload not yet completed
    files/<jobId>.jsonl      a job's input file, written whole before its job row exists

Why it cannot lose or double a line: a line is one row; its result is written
into that row, with the job's counters, in one transaction, and only while the
row is still pending.  A line whose request was in flight when a process died
is still pending, so it runs again; a second answer for a line that already has
one changes nothing.  The result file is read from these rows, in line order.

Every writer uses BEGIN IMMEDIATE, so two processes never both hold a read
snapshot they then try to upgrade (which SQLite would refuse at once, not wait for).

Quotas: every stored part and job input file has its size in a row (parts.bytes,
jobs.input_bytes); a part is counted, checked against the file limit and the
store's BATCH_MAX_STORED_BYTES, and moved into place in one write transaction, so
parts sent in parallel cannot pass the checks together.  The store is its owner's
only: directories 0700, files 0600, whatever the umask.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

# Job states, as the Batch API names them ("cancelled" is ours).
CHUNKING, PROCESSING, COMPLETED, FAILED, CANCELLED = "chunking", "processing", "completed", "failed", "cancelled"
FINAL_STATES = (COMPLETED, FAILED, CANCELLED)
# Line states.
PENDING, OK, ERROR = "pending", "ok", "error"

# Ids are ours (uuid4 hex): anything else in a path is refused before it touches the disk.
ID_PATTERN = re.compile(r"[0-9a-f]{32}")
MAX_PART_NUMBER = 10_000
COPY_CHUNK = 1 << 20
TMP_FILE_AGE_S = 3600  # an input file still being joined after this long was left by a crash
PURGE_LINES_PER_WRITE = 5000  # lines purge deletes in one write transaction

# Columns added after the first release: a store made by an older version gets them on first use.
ADDED_JOB_COLUMNS = {"input_bytes": "INTEGER NOT NULL DEFAULT 0", "chunk_attempts": "INTEGER NOT NULL DEFAULT 0"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    file_id TEXT PRIMARY KEY, upload_id TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    created_at REAL NOT NULL, completed_at REAL, expires_at REAL NOT NULL,
    total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    error_code TEXT, error_message TEXT,
    input_bytes INTEGER NOT NULL DEFAULT 0, chunk_attempts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS parts (
    file_id TEXT NOT NULL, part_number INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (file_id, part_number)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lines (
    job_id TEXT NOT NULL, line_index INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    state TEXT NOT NULL, result BLOB, PRIMARY KEY (job_id, line_index)) WITHOUT ROWID;
"""


class NotFound(LookupError):
    """No such job or upload (or the wrong uploadId for it)."""


class UploadError(ValueError):
    """A part or completion the store refuses: code is the API's error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def new_id() -> str:
    return uuid.uuid4().hex


def check_id(value: str) -> str:
    if not ID_PATTERN.fullmatch(value or ""):
        raise NotFound("no such batch or file")
    return value


def _private_mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # mkdir's mode only applies to a new folder, and only as the umask allows


def _private_open(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open with 0600 whatever the umask (an opener for open())."""
    fd = os.open(path, flags, mode)
    os.fchmod(fd, mode)
    return fd


def private_writer(path: Path):
    """open(path, "wb"), readable by the owner only."""
    return open(path, "wb", opener=_private_open)


class BatchStore:
    def __init__(self, data_dir: str | os.PathLike, retention_hours: float = 168.0,
                 max_open_uploads: int = 0, max_stored_bytes: int = 0):
        self.root = Path(data_dir)
        self.uploads_dir = self.root / "uploads"
        self.files_dir = self.root / "files"
        self.retention_s = retention_hours * 3600
        self.db_path = self.root / "batch.sqlite3"
        self.max_open_uploads = max_open_uploads  # 0: no limit
        self.max_stored_bytes = max_stored_bytes  # 0: no limit
        self.purge_lines_per_write = PURGE_LINES_PER_WRITE
        self._created = False

    def _create(self) -> None:
        """Directories and tables, on first use (an app that never sees a batch leaves no trace)."""
        for d in (self.root, self.uploads_dir, self.files_dir):
            _private_mkdir(d)
        # SQLite gives the -wal and -shm files the database file's own mode: made 0600 first.
        os.close(_private_open(self.db_path, os.O_RDWR | os.O_CREAT))
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # stored in the file: every later connection uses it
            conn.executescript(SCHEMA)
            have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
            for name, kind in ADDED_JOB_COLUMNS.items():
                if name not in have:
                    try:
                        conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
                    except sqlite3.OperationalError:  # added meanwhile by the other process
                        pass
        finally:
            conn.close()
        self._created = True

    # ------------------------------------------------------------------ connections
    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """One connection per use: sqlite3 connections must not cross threads, and opening is cheap."""
        if not self._created:
            self._create()
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        # WAL + NORMAL: a killed process loses nothing committed (only a power cut could).
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: it waits for other writers, up to the timeout)."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def input_path(self, job_id: str) -> Path:
        return self.files_dir / f"{check_id(job_id)}.jsonl"

    # ------------------------------------------------------------------ uploads (front end)
    def create_upload(self) -> tuple[str, str]:
        """A new upload; refused (429) beyond BATCH_MAX_OPEN_UPLOADS uploads not yet completed or aborted."""
        file_id, upload_id = new_id(), new_id()
        with self.write() as conn:
            if self.max_open_uploads:
                (open_now,) = conn.execute("SELECT count(*) FROM uploads").fetchone()
                if open_now >= self.max_open_uploads:
                    raise UploadError(429, "quota_exceeded",
                                      f"{open_now} uploads are open, the most allowed (BATCH_MAX_OPEN_UPLOADS): "
                                      "complete or abort one first")
            (self.uploads_dir / file_id).mkdir(mode=0o700)
            conn.execute("INSERT INTO uploads VALUES (?, ?, ?)", (file_id, upload_id, time.time()))
        return file_id, upload_id

    def stored_bytes(self, conn: sqlite3.Connection) -> int:
        """Bytes held by upload parts and job input files (what BATCH_MAX_STORED_BYTES bounds)."""
        return conn.execute("SELECT (SELECT coalesce(sum(bytes), 0) FROM parts)"
                            " + (SELECT coalesce(sum(input_bytes), 0) FROM jobs)").fetchone()[0]

    def _check_room(self, conn: sqlite3.Connection, adding: int) -> None:
        if self.max_stored_bytes and self.stored_bytes(conn) + adding > self.max_stored_bytes:
            raise UploadError(429, "quota_exceeded",
                              f"the batch store holds its most ({self.max_stored_bytes} bytes, BATCH_MAX_STORED_BYTES)"
                              " in uploads and jobs: wait for jobs to expire or abort an upload")

    def _upload_dir(self, file_id: str, upload_id: str) -> Path:
        with self.connect() as conn:
            row = conn.execute("SELECT upload_id FROM uploads WHERE file_id = ?", (check_id(file_id),)).fetchone()
        if row is None or row["upload_id"] != upload_id:
            raise NotFound("no such upload (unknown fileId or uploadId, or already completed or aborted)")
        return self.uploads_dir / file_id

    def put_part(self, file_id: str, upload_id: str, part_number: int, body, max_file_bytes: int) -> str:
        """Store one part from the readable `body`; returns its etag (MD5, as S3 does).
        Refuses a part that would make the file larger than `max_file_bytes` (413), or the
        store hold more than its quota (429).  The part is read into a temporary file first;
        the checks and the move into place are one transaction (parallel parts cannot both pass)."""
        folder = self._upload_dir(file_id, upload_id)
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise UploadError(400, "invalid_request", f"partNumber must be between 1 and {MAX_PART_NUMBER}")
        too_large = UploadError(413, "limit_exceeded", f"the batch file would be larger than {max_file_bytes} bytes")
        with self.connect() as conn:  # early refusals, before reading a byte (checked again below)
            if self._others_bytes(conn, file_id, part_number) >= max_file_bytes:
                raise too_large
            self._check_room(conn, 1)
        digest = hashlib.md5(usedforsecurity=False)
        tmp = folder / f"{part_number}.{new_id()}.tmp"
        written = 0
        try:
            with private_writer(tmp) as out:
                while chunk := body.read(COPY_CHUNK):
                    written += len(chunk)
                    if written > max_file_bytes:
                        raise too_large
                    digest.update(chunk)
                    out.write(chunk)
            with self.write() as conn:
                if not conn.execute("SELECT 1 FROM uploads WHERE file_id = ? AND upload_id = ?",
                                    (file_id, upload_id)).fetchone():
                    raise NotFound("no such upload (completed or aborted meanwhile)")
                if self._others_bytes(conn, file_id, part_number) + written > max_file_bytes:
                    raise too_large
                replaced = conn.execute("SELECT bytes FROM parts WHERE file_id = ? AND part_number = ?",
                                        (file_id, part_number)).fetchone()
                self._check_room(conn, written - (replaced[0] if replaced else 0))
                conn.execute("INSERT OR REPLACE INTO parts VALUES (?, ?, ?)", (file_id, part_number, written))
                os.replace(tmp, folder / str(part_number))  # a part is whole or absent
        except FileNotFoundError:  # its folder went with a completion or abort meanwhile
            raise NotFound("no such upload (completed or aborted meanwhile)") from None
        finally:
            tmp.unlink(missing_ok=True)
        return digest.hexdigest()

    @staticmethod
    def _others_bytes(conn: sqlite3.Connection, file_id: str, part_number: int) -> int:
        return conn.execute("SELECT coalesce(sum(bytes), 0) FROM parts WHERE file_id = ? AND part_number != ?",
                            (file_id, part_number)).fetchone()[0]

    def complete_upload(self, file_id: str, upload_id: str, parts: list[tuple[int, str]]) -> dict:
        """Join the named parts into a new job's input file and create the job (status chunking).
        The job row is written only once the file is whole: a job never reads half a file."""
        folder = self._upload_dir(file_id, upload_id)
        if not parts:
            raise UploadError(400, "invalid_request", "parts must list at least one part")
        numbers = [n for n, _ in parts]
        if numbers != sorted(set(numbers)):
            raise UploadError(400, "invalid_request", "parts must be in ascending partNumber order, each once")
        for number, etag in parts:
            path = folder / str(number)
            if not path.is_file():
                raise UploadError(400, "invalid_request", f"part {number} was not uploaded")
            if _md5(path) != etag.strip('"'):
                raise UploadError(400, "invalid_request", f"part {number}: etag does not match the uploaded part")
        job_id = new_id()
        target = self.input_path(job_id)
        tmp = target.with_suffix(".tmp")
        with private_writer(tmp) as out:
            for number, _ in parts:
                with open(folder / str(number), "rb") as part:
                    shutil.copyfileobj(part, out, COPY_CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        now = time.time()
        with self.write() as conn:
            gone = conn.execute("DELETE FROM uploads WHERE file_id = ? AND upload_id = ?", (file_id, upload_id)).rowcount
            if not gone:  # completed or aborted meanwhile by another request
                target.unlink(missing_ok=True)
                raise NotFound("no such upload (already completed or aborted)")
            conn.execute("DELETE FROM parts WHERE file_id = ?", (file_id,))  # their bytes are the job's now
            conn.execute("INSERT INTO jobs (id, status, created_at, expires_at, input_bytes) VALUES (?, ?, ?, ?, ?)",
                         (job_id, CHUNKING, now, now + self.retention_s, target.stat().st_size))
        shutil.rmtree(folder, ignore_errors=True)
        return self.get_job(job_id)

    def abort_upload(self, file_id: str, upload_id: str) -> None:
        folder = self._upload_dir(file_id, upload_id)
        with self.write() as conn:
            conn.execute("DELETE FROM uploads WHERE file_id = ?", (file_id,))
            conn.execute("DELETE FROM parts WHERE file_id = ?", (file_id,))
        shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ jobs (front end)
    def get_job(self, job_id: str) -> dict:
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (check_id(job_id),)).fetchone()
        if row is None:
            raise NotFound("no such batch")
        return dict(row)

    def list_jobs(self, limit: int, before_seq: Optional[int] = None) -> list[dict]:
        """Newest first; `before_seq` continues a listing (the cursor)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                                (before_seq if before_seq is not None else 1 << 62, limit)).fetchall()
        return [dict(r) for r in rows]

    def cancel_job(self, job_id: str) -> dict:
        """Stop a job: its pending lines are not started any more (idempotent; a finished job stays as it is)."""
        with self.write() as conn:
            conn.execute("UPDATE jobs SET status = ?, completed_at = ?, expires_at = ? WHERE id = ? AND status IN (?, ?)",
                         (CANCELLED, time.time(), time.time() + self.retention_s, check_id(job_id), CHUNKING, PROCESSING))
        return self.get_job(job_id)

    def results(self, job_id: str, first: int, stop: int) -> Iterator[bytes]:
        """Result lines of lines first..stop-1 that have one, in line order, each ending in a newline."""
        check_id(job_id)
        batch = 500
        while first < stop:
            with self.connect() as conn:
                rows = conn.execute("SELECT line_index, result FROM lines WHERE job_id = ? AND line_index >= ? AND line_index < ?"
                                    " AND state != ? ORDER BY line_index LIMIT ?",
                                    (job_id, first, stop, PENDING, batch)).fetchall()
            if not rows:
                return
            for row in rows:
                yield bytes(row["result"]) + b"\n"
            first = rows[-1]["line_index"] + 1

    def summary(self) -> dict:
        """Counts for /metrics and /health: jobs by status, lines by outcome, lines waiting."""
        if not self.db_path.exists():
            return {"jobs": {}, "lines": {OK: 0, ERROR: 0}, "lines_waiting": 0}
        with self.connect() as conn:
            jobs = {r[0]: r[1] for r in conn.execute("SELECT status, count(*) FROM jobs GROUP BY status")}
            ok, failed, waiting = conn.execute(
                "SELECT coalesce(sum(completed), 0), coalesce(sum(failed), 0),"
                " coalesce(sum(CASE WHEN status = ? THEN total - completed - failed ELSE 0 END), 0) FROM jobs",
                (PROCESSING,)).fetchone()
        return {"jobs": jobs, "lines": {OK: ok, ERROR: failed}, "lines_waiting": waiting}

    # ------------------------------------------------------------------ the batch worker
    def jobs_in(self, status: str) -> list[dict]:
        with self.connect() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,))]

    def set_lines(self, job_id: str, spans: list[tuple[int, int]]) -> None:
        """The chunked job's lines (offset, length), all pending; the job moves to processing.
        Re-chunking after a crash replaces whatever an earlier attempt left."""
        with self.write() as conn:
            if conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] != CHUNKING:
                return  # cancelled meanwhile
            conn.execute("DELETE FROM lines WHERE job_id = ?", (job_id,))
            conn.executemany("INSERT INTO lines (job_id, line_index, offset, length, state) VALUES (?, ?, ?, ?, ?)",
                             ((job_id, i, offset, length, PENDING) for i, (offset, length) in enumerate(spans)))
            conn.execute("UPDATE jobs SET status = ?, total = ? WHERE id = ?", (PROCESSING, len(spans), job_id))

    def begin_chunking(self, job_id: str) -> int:
        """Count one more attempt at chunking the job; returns the count, this one included
        (a job whose file crashed the batch worker is not read forever)."""
        with self.write() as conn:
            conn.execute("UPDATE jobs SET chunk_attempts = chunk_attempts + 1 WHERE id = ?", (job_id,))
            row = conn.execute("SELECT chunk_attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else 0

    def fail_job(self, job_id: str, code: str, message: str) -> None:
        """A batch-level error (validation_error, limit_exceeded, empty_batch)."""
        now = time.time()
        with self.write() as conn:
            conn.execute("UPDATE jobs SET status = ?, error_code = ?, error_message = ?, completed_at = ?, expires_at = ?"
                         " WHERE id = ? AND status = ?", (FAILED, code, message, now, now + self.retention_s, job_id, CHUNKING))

    def pending_lines(self, job_id: str, after: int, limit: int) -> list[tuple[int, int, int]]:
        """(line_index, offset, length) of pending lines after `after`, in order."""
        with self.connect() as conn:
            return [tuple(r) for r in conn.execute(
                "SELECT line_index, offset, length FROM lines WHERE job_id = ? AND state = ? AND line_index > ?"
                " ORDER BY line_index LIMIT ?", (job_id, PENDING, after, limit))]

    def record_result(self, job_id: str, line_index: int, ok: bool, result: bytes,
                      input_tokens: int = 0, output_tokens: int = 0) -> bool:
        """Write a line's one result with the job's counters; completes the job on its last line.
        False (and nothing written) when the line already has a result or the job is not running."""
        with self.write() as conn:
            written = conn.execute(
                "UPDATE lines SET state = ?, result = ? WHERE job_id = ? AND line_index = ? AND state = ?"
                " AND EXISTS (SELECT 1 FROM jobs WHERE id = ? AND status = ?)",
                (OK if ok else ERROR, result, job_id, line_index, PENDING, job_id, PROCESSING)).rowcount
            if not written:
                return False
            done = "completed" if ok else "failed"
            conn.execute(f"UPDATE jobs SET {done} = {done} + 1, input_tokens = input_tokens + ?,"
                         " output_tokens = output_tokens + ? WHERE id = ?", (input_tokens, output_tokens, job_id))
            now = time.time()
            conn.execute("UPDATE jobs SET status = ?, completed_at = ?, expires_at = ?"
                         " WHERE id = ? AND completed + failed = total", (COMPLETED, now, now + self.retention_s, job_id))
        return True

    def status_of(self, job_id: str) -> Optional[str]:
        with self.connect() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def purge(self, now: Optional[float] = None) -> int:
        """Delete finished jobs past their expiry (rows and input file), uploads never completed,
        and files a crash left behind.  Lines go PURGE_LINES_PER_WRITE at a time, each batch its own
        write transaction: a job of a million lines must not hold up the batch workers' writes."""
        now = time.time() if now is None else now
        with self.connect() as conn:
            expired = [r[0] for r in conn.execute(
                f"SELECT id FROM jobs WHERE expires_at < ? AND status IN ({','.join('?' * len(FINAL_STATES))})",
                (now, *FINAL_STATES))]
        for job_id in expired:
            self._delete_job(job_id)
        with self.write() as conn:
            stale = [r[0] for r in conn.execute("SELECT file_id FROM uploads WHERE created_at < ?", (now - self.retention_s,))]
            conn.executemany("DELETE FROM uploads WHERE file_id = ?", ((f,) for f in stale))
            conn.executemany("DELETE FROM parts WHERE file_id = ?", ((f,) for f in stale))
        for file_id in stale:
            shutil.rmtree(self.uploads_dir / file_id, ignore_errors=True)
        self._remove_left_files(now)
        return len(expired)

    def _delete_job(self, job_id: str) -> None:
        """A finished job's lines (in bounded write transactions), then its row, then its file."""
        while True:
            with self.write() as conn:
                deleted = conn.execute(
                    "DELETE FROM lines WHERE job_id = ? AND line_index IN "
                    "(SELECT line_index FROM lines WHERE job_id = ? LIMIT ?)",
                    (job_id, job_id, self.purge_lines_per_write)).rowcount
                if deleted < self.purge_lines_per_write:
                    conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                    break
        self.input_path(job_id).unlink(missing_ok=True)

    def _remove_left_files(self, now: float) -> None:
        """Input files no job row owns: a completion cut short by a crash, before (.tmp) or after
        (.jsonl) its rename.  Only old ones: a completion may be between its rename and INSERT now."""
        old = now - TMP_FILE_AGE_S
        left = [p for p in self.files_dir.glob("*.tmp") if p.stat().st_mtime < old]
        candidates = {p.stem: p for p in self.files_dir.glob("*.jsonl")
                      if ID_PATTERN.fullmatch(p.stem) and p.stat().st_mtime < old}
        stems = list(candidates)
        owned: set[str] = set()
        with self.connect() as conn:
            for start in range(0, len(stems), 500):  # SQLite bounds the variables of one statement
                batch = stems[start:start + 500]
                owned.update(r[0] for r in conn.execute(f"SELECT id FROM jobs WHERE id IN ({','.join('?' * len(batch))})",
                                                        batch))
        left += [p for stem, p in candidates.items() if stem not in owned]
        for path in left:
            path.unlink(missing_ok=True)


def batch_store_for(config) -> BatchStore:
    """The store with the configured retention and quotas (front end and batch worker alike)."""
    return BatchStore(config.batch_data_dir, config.batch_retention_hours,
                      config.batch_max_open_uploads, config.batch_max_stored_bytes)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
