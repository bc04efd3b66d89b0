"""The Batch API (Moondream's routes and formats): upload a JSONL file in parts,
poll the job, download JSONL results.  The work itself is the batch worker's
(batch_worker/); these routes only read and write the job store
(shared/batch_store.py).

    POST   /v1/batch?action=mpu-create                                  -> {fileId, uploadId}
    POST   /v1/batch   multipart/form-data, the file as part `file`     -> {id, status}
           (ours, not the cloud's: `curl -F file=@batch.jsonl`, one request for a file up to MAX_BODY_BYTES)
    PUT    /v1/batch/{fileId}?action=mpu-uploadpart&uploadId=&partNumber=N  (octet-stream) -> {etag, partNumber}
    POST   /v1/batch/{fileId}?action=mpu-complete&uploadId=   {"parts": [{partNumber, etag}]} -> {id, status}
    DELETE /v1/batch/{fileId}?action=mpu-abort&uploadId=
    GET    /v1/batch/{id}                  status, progress, usage, outputs, times
    GET    /v1/batch?limit=&cursor=        jobs, newest first
    POST   /v1/batch/{id}/cancel           stop the job's remaining lines
    GET    /v1/batch/{id}/results/{index}  one JSONL result file (outputs[index].url)

The API key guards them like every /v1 route (AuthMiddleware); ids are random
128-bit values checked before they touch a path, so a job's files are reachable
only through its own id.
"""
from __future__ import annotations

import datetime
import io

import falcon
import msgspec
from prometheus_client.core import GaugeMetricFamily

from frontend import forms
from api.errors import ApiError
from frontend.bodies import read_body
from api.batch_schemas import LIST_DEFAULT, LIST_MAX, MAX_CURSOR, CompleteBody
from shared import batch_store
from shared.batch_store import BatchStore, batch_store_for
from shared.config import Config

OUTPUT_LINES = 10_000  # result lines per output file


def _not_found(ex: batch_store.NotFound) -> ApiError:
    return ApiError(404, "not_found", str(ex))


HOW_TO_UPLOAD = (
    "action must be mpu-create to start an upload in parts (README, \"The Batch API by hand\"); "
    "or send a file up to MAX_BODY_BYTES in one request as multipart/form-data: curl -F file=@batch.jsonl .../v1/batch")


def _action(req: falcon.Request, *allowed: str) -> str:
    action = req.get_param("action") or ""
    if action not in allowed:
        raise ApiError(400, "invalid_request", f"action must be one of {', '.join(allowed)}")
    return action


def _required(req: falcon.Request, name: str) -> str:
    value = req.get_param(name)
    if not value:
        raise ApiError(400, "invalid_request", f"the {name} query parameter is required")
    return value


def job_body(job: dict, base_url: str) -> dict:
    """A job as GET /v1/batch/{id} shows it.  `base_url` is PUBLIC_BASE_URL, or "" for URLs
    relative to the server: never the request's Host header, which the client chooses."""
    done = job["status"] in batch_store.FINAL_STATES or job["completed"] + job["failed"] > 0
    outputs = []
    if done and job["total"]:
        outputs = [{"index": i, "url": f"{base_url.rstrip('/')}/v1/batch/{job['id']}/results/{i}"}
                   for i in range((job["total"] + OUTPUT_LINES - 1) // OUTPUT_LINES)]
    body = {
        "id": job["id"],
        "status": job["status"],
        "progress": {"total": job["total"], "completed": job["completed"], "failed": job["failed"]},
        "usage": {"input_tokens": job["input_tokens"], "output_tokens": job["output_tokens"]},
        "outputs": outputs,
        "created_at": _iso(job["created_at"]),
        "completed_at": _iso(job["completed_at"]),
        "expires_at": _iso(job["expires_at"]),
    }
    if job["error_code"]:
        body["error"] = {"code": job["error_code"], "message": job["error_message"]}
    return body


def _iso(t):
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class BatchCollection:
    """/v1/batch: start an upload (POST), list jobs (GET)."""

    def __init__(self, store: BatchStore, config: Config):
        self._store = store
        self._config = config

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not req.get_param("action") and forms.media_type(req.content_type) == "multipart/form-data":
            resp.media = self.one_shot(req)
            return
        if (req.get_param("action") or "") != "mpu-create":
            raise ApiError(400, "invalid_request", HOW_TO_UPLOAD)
        try:
            file_id, upload_id = self._store.create_upload()
        except batch_store.UploadError as ex:  # BATCH_MAX_OPEN_UPLOADS
            raise ApiError(ex.status, ex.code, ex.message) from None
        resp.media = {"fileId": file_id, "uploadId": upload_id}

    def one_shot(self, req: falcon.Request) -> dict:
        """`curl -F file=@batch.jsonl .../v1/batch`: create, upload one part, complete, in one request."""
        body = read_body(req, self._config.max_body_bytes)
        try:
            _, data = forms.read_fields(body, req.content_type, self._config.max_body_bytes, file_part="file")
        except forms.FormError as ex:
            raise ApiError(400, "invalid_form", str(ex)) from None
        if data is None:
            raise ApiError(400, "invalid_request", "send the JSONL file as the part named `file` "
                           "(curl -F file=@batch.jsonl ...)")
        try:
            file_id, upload_id = self._store.create_upload()
            etag = self._store.put_part(file_id, upload_id, 1, io.BytesIO(data), self._config.batch_max_file_bytes)
            job = self._store.complete_upload(file_id, upload_id, [(1, etag)])
        except batch_store.UploadError as ex:
            raise ApiError(ex.status, ex.code, ex.message) from None
        return {"id": job["id"], "status": job["status"]}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = req.get_param_as_int("limit", min_value=1, max_value=LIST_MAX, default=LIST_DEFAULT)
        cursor = req.get_param_as_int("cursor", min_value=0, max_value=MAX_CURSOR)  # larger: SQLite would raise
        jobs = self._store.list_jobs(limit + 1, cursor)
        more = len(jobs) > limit
        jobs = jobs[:limit]
        resp.media = {"data": [job_body(j, self._config.public_base_url) for j in jobs], "has_more": more,
                      "next_cursor": str(jobs[-1]["seq"]) if more else None}


class BatchItem:
    """/v1/batch/{item_id}: an upload (PUT a part, POST complete, DELETE abort) or a job (GET)."""

    def __init__(self, store: BatchStore, config: Config):
        self._store = store
        self._config = config

    def on_put(self, req: falcon.Request, resp: falcon.Response, item_id: str) -> None:
        _action(req, "mpu-uploadpart")
        upload_id = _required(req, "uploadId")
        part_number = req.get_param_as_int("partNumber", required=True)
        try:
            etag = self._store.put_part(item_id, upload_id, part_number, req.bounded_stream,
                                        self._config.batch_max_file_bytes)
        except batch_store.NotFound as ex:
            raise _not_found(ex) from None
        except batch_store.UploadError as ex:
            raise ApiError(ex.status, ex.code, ex.message) from None
        resp.set_header("ETag", f'"{etag}"')
        resp.media = {"etag": etag, "partNumber": part_number}

    def on_post(self, req: falcon.Request, resp: falcon.Response, item_id: str) -> None:
        _action(req, "mpu-complete")
        upload_id = _required(req, "uploadId")
        try:
            body = msgspec.json.decode(req.bounded_stream.read(self._config.max_body_bytes), type=CompleteBody)
        except msgspec.DecodeError as ex:  # ValidationError included
            raise ApiError(400, "invalid_request", f"the body must be {{\"parts\": [{{partNumber, etag}}]}}: {ex}") from None
        except RecursionError:  # unknown fields are skipped recursively: 2000 nested brackets
            raise ApiError(400, "invalid_request", "the body is nested too deeply") from None
        try:
            job = self._store.complete_upload(item_id, upload_id, [(p.part_number, p.etag) for p in body.parts])
        except batch_store.NotFound as ex:
            raise _not_found(ex) from None
        except batch_store.UploadError as ex:
            raise ApiError(ex.status, ex.code, ex.message) from None
        resp.media = {"id": job["id"], "status": job["status"]}

    def on_delete(self, req: falcon.Request, resp: falcon.Response, item_id: str) -> None:
        _action(req, "mpu-abort")
        try:
            self._store.abort_upload(item_id, _required(req, "uploadId"))
        except batch_store.NotFound as ex:
            raise _not_found(ex) from None
        resp.media = {"fileId": item_id, "status": "aborted"}

    def on_get(self, req: falcon.Request, resp: falcon.Response, item_id: str) -> None:
        try:
            resp.media = job_body(self._store.get_job(item_id), self._config.public_base_url)
        except batch_store.NotFound as ex:
            raise _not_found(ex) from None


class BatchCancel:
    """POST /v1/batch/{item_id}/cancel"""

    def __init__(self, store: BatchStore, base_url: str):
        self._store = store
        self._base_url = base_url

    def on_post(self, req: falcon.Request, resp: falcon.Response, item_id: str) -> None:
        try:
            resp.media = job_body(self._store.cancel_job(item_id), self._base_url)
        except batch_store.NotFound as ex:
            raise _not_found(ex) from None


class BatchResults:
    """GET /v1/batch/{item_id}/results/{index}: result lines index*OUTPUT_LINES.., in line order."""

    def __init__(self, store: BatchStore):
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, item_id: str, index: int) -> None:
        try:
            job = self._store.get_job(item_id)
        except batch_store.NotFound as ex:
            raise _not_found(ex) from None
        first = index * OUTPUT_LINES
        if index < 0 or first >= max(job["total"], 1):
            raise ApiError(404, "not_found", "no such output")
        resp.content_type = "application/jsonl"
        resp.stream = self._store.results(item_id, first, min(first + OUTPUT_LINES, job["total"]))


class BatchCollector:
    """Batch gauges for /metrics, read from the store at scrape time."""

    def __init__(self, store: BatchStore):
        self._store = store

    def describe(self):
        return []

    def collect(self):
        summary = self._store.summary()
        jobs = GaugeMetricFamily("moondream_batch_jobs", "Batch jobs, by status", labels=["status"])
        for status in (batch_store.CHUNKING, batch_store.PROCESSING, *batch_store.FINAL_STATES):
            jobs.add_metric([status], summary["jobs"].get(status, 0))
        lines = GaugeMetricFamily("moondream_batch_lines", "Lines of stored batch jobs with a result, by status",
                                  labels=["status"])
        for status, count in summary["lines"].items():
            lines.add_metric([status], count)
        yield jobs
        yield lines
        yield GaugeMetricFamily("moondream_batch_lines_waiting", "Lines of running batch jobs without a result yet",
                                value=summary["lines_waiting"])


def add_routes(app: falcon.App, config: Config) -> BatchStore:
    """Mount the Batch API on `app`; returns the store (for /metrics and /health)."""
    store = batch_store_for(config)
    app.add_route("/v1/batch", BatchCollection(store, config))
    app.add_route("/v1/batch/{item_id}", BatchItem(store, config))
    app.add_route("/v1/batch/{item_id}/cancel", BatchCancel(store, config.public_base_url))
    app.add_route("/v1/batch/{item_id}/results/{index:int}", BatchResults(store))
    return store
