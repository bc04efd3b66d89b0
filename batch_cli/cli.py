"""`moondream-batch`: bulk jobs through the Batch API, against this server or Moondream's cloud.

    moondream-batch submit FILE.jsonl [--model ID] [--wait] [-o results.jsonl]
    moondream-batch status ID
    moondream-batch list [--limit N]
    moondream-batch cancel ID
    moondream-batch download ID -o results.jsonl

The endpoint and key come from --endpoint / --api-key or the environment
(MOONDREAM_ENDPOINT, MOONDREAM_API_KEY or VLM_API_KEY).  The file is uploaded in
parts (--part-mb, 8 MiB by default: below the server's MAX_BODY_BYTES), then
--wait shows a progress bar (tqdm) of lines done and failed, lines/s and ETA.  --model names
the model for every line that names none (a server with several models, MOONDREAM_MODELS).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional

from tqdm import tqdm

DEFAULT_ENDPOINT = "http://127.0.0.1:5000"
FINAL = ("completed", "failed", "cancelled")


class ApiFailure(Exception):
    pass


class BatchClient:
    def __init__(self, endpoint: str, api_key: Optional[str], timeout: float = 60.0):
        self.base = endpoint.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.timeout = timeout

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                content_type: str = "application/json") -> bytes:
        url = path if path.startswith("http") else self.base + path
        headers = {"Content-Type": content_type} if body is not None else {}
        if self.api_key:
            headers["X-Moondream-Auth"] = self.api_key
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise ApiFailure(f"{method} {path}: HTTP {err.code} {detail}") from None
        except urllib.error.URLError as err:
            raise ApiFailure(f"{method} {url}: {err.reason}") from None

    def json(self, method: str, path: str, payload=None) -> dict:
        body = json.dumps(payload).encode() if payload is not None else None
        return json.loads(self.request(method, path, body))

    def submit(self, path: str, part_bytes: int) -> dict:
        """Upload `path` in parts and complete it: the new job's {id, status}."""
        created = self.json("POST", "/v1/batch?action=mpu-create")
        file_id, upload_id = created["fileId"], created["uploadId"]
        parts = []
        try:
            with open(path, "rb") as f:
                while chunk := f.read(part_bytes):
                    number = len(parts) + 1
                    answer = json.loads(self.request(
                        "PUT", f"/v1/batch/{file_id}?action=mpu-uploadpart&uploadId={upload_id}&partNumber={number}",
                        chunk, "application/octet-stream"))
                    parts.append({"partNumber": number, "etag": answer["etag"]})
            return self.json("POST", f"/v1/batch/{file_id}?action=mpu-complete&uploadId={upload_id}", {"parts": parts})
        except BaseException:
            try:  # leave no half upload behind
                self.request("DELETE", f"/v1/batch/{file_id}?action=mpu-abort&uploadId={upload_id}")
            except ApiFailure:
                pass
            raise

    def status(self, job_id: str) -> dict:
        return self.json("GET", f"/v1/batch/{job_id}")

    def wait(self, job_id: str, interval: float, out=sys.stderr) -> dict:
        """Poll until the job ends, drawing a progress bar; the final status."""
        job = self.status(job_id)
        with tqdm(total=job["progress"]["total"] or None, unit="line", file=out, dynamic_ncols=True,
                  desc=job_id[:8]) as bar:
            while True:
                progress = job["progress"]
                bar.total = progress["total"] or bar.total
                bar.update(progress["completed"] + progress["failed"] - bar.n)
                bar.set_postfix(failed=progress["failed"], status=job["status"])
                if job["status"] in FINAL:
                    return job
                time.sleep(interval)
                job = self.status(job_id)

    def download(self, job_id: str, target: str) -> int:
        """Write every output file, in order, to `target`; the number of result lines."""
        job = self.status(job_id)
        count = 0
        with open(target, "wb") as out:
            for output in sorted(job["outputs"], key=lambda o: o["index"]):
                data = self.request("GET", output["url"])
                out.write(data)
                count += data.count(b"\n")
        return count


def reason(job: dict) -> str:
    """Why a job failed as a whole ("code: message"), or ""."""
    error = job.get("error")
    return f"{error['code']}: {error['message']}" if error else ""


def summary(job: dict) -> str:
    """One line: status, counts, and the reason of a job that failed as a whole."""
    p = job["progress"]
    line = f"{job['status']}: {p['completed']} ok, {p['failed']} failed of {p['total']}"
    return line + (f" ({reason(job)})" if job.get("error") else "")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moondream-batch", description="Bulk jobs through Moondream's Batch API.")
    p.add_argument("--endpoint", default=os.environ.get("MOONDREAM_ENDPOINT", DEFAULT_ENDPOINT),
                   help="server URL (env MOONDREAM_ENDPOINT; default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("MOONDREAM_API_KEY") or os.environ.get("VLM_API_KEY"),
                   help="X-Moondream-Auth key (env MOONDREAM_API_KEY or VLM_API_KEY)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="upload a JSONL file and start a job; prints its id")
    s.add_argument("file")
    s.add_argument("--model", help="the model for every line that names none (e.g. moondream3-preview)")
    s.add_argument("--wait", action="store_true", help="show progress until the job ends")
    s.add_argument("-o", "--output", help="with --wait: download the results here")
    s.add_argument("--part-mb", type=float, default=8.0, help="upload part size in MiB (default 8)")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    st = sub.add_parser("status", help="a job's status as JSON")
    st.add_argument("id")
    ls = sub.add_parser("list", help="jobs, newest first")
    ls.add_argument("--limit", type=int, default=20)
    c = sub.add_parser("cancel", help="stop a job's remaining lines")
    c.add_argument("id")
    d = sub.add_parser("download", help="write a job's results (JSONL, in line order)")
    d.add_argument("id")
    d.add_argument("-o", "--output", required=True)
    return p


def with_model(path: str, model: str) -> str:
    """A copy of the JSONL file whose lines (JSON objects without a `model`) name `model`; other
    lines are copied as they are (the server reports what is wrong with them).  Returns its path."""
    out = tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False)
    with open(path, "rb") as f, out:
        for raw in f:
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            if isinstance(line, dict) and "model" not in line:
                raw = json.dumps({**line, "model": model}).encode() + b"\n"
            out.write(raw)
    return out.name


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    client = BatchClient(args.endpoint, args.api_key)
    try:
        if args.command == "submit":
            upload = with_model(args.file, args.model) if args.model else args.file
            try:
                job = client.submit(upload, max(1, int(args.part_mb * 1024 * 1024)))
            finally:
                if upload != args.file:
                    os.remove(upload)
            print(job["id"], flush=True)
            if args.wait:
                job = client.wait(job["id"], args.interval)
                print(summary(job), file=sys.stderr)
                if args.output and job["outputs"]:
                    client.download(job["id"], args.output)
                return 0 if job["status"] == "completed" else 1
        elif args.command == "status":
            job = client.status(args.id)
            print(json.dumps(job, indent=2))  # stdout: the job as the API gives it, for scripts
            print(summary(job), file=sys.stderr)  # the terminal: one line, with a failed job's reason
        elif args.command == "list":
            for job in client.json("GET", f"/v1/batch?limit={args.limit}")["data"]:
                p = job["progress"]
                print(f"{job['id']}  {job['status']:<10}  {p['completed'] + p['failed']}/{p['total']}"
                      f"  failed {p['failed']}  {job['created_at']}" + (f"  {reason(job)}" if job.get("error") else ""))
        elif args.command == "cancel":
            print(client.json("POST", f"/v1/batch/{args.id}/cancel")["status"])
        elif args.command == "download":
            count = client.download(args.id, args.output)
            print(f"{count} result lines written to {args.output}", file=sys.stderr)
    except ApiFailure as ex:
        print(f"moondream-batch: {ex}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
