"""The Batch API's routes in /openapi.json (frontend/openapi.py builds the rest
of the document and calls `paths`).  The routes are frontend/batch_api.py's;
one method of a path takes one `action`, so each action is its own operation."""
from __future__ import annotations

from api import batch_schemas
from frontend import openapi_parts as base
from shared.batch_store import MAX_PART_NUMBER
from shared.config import Config

SCHEMAS = batch_schemas.SCHEMAS

ERRORS = {
    400: "A missing or wrong `action`, a missing uploadId, a bad partNumber, limit or cursor, or a part "
         "list that does not match the uploaded parts (invalid_request).",
    401: "Missing or wrong API key (X-Moondream-Auth or Authorization: Bearer).",
    404: "No such batch, upload or output (an unknown id, or an upload already completed or aborted).",
    413: "The part is larger than MAX_BODY_BYTES, or the file would be larger than BATCH_MAX_FILE_BYTES "
         "(limit_exceeded).",
}

ITEM_ID = {"name": "item_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
           "description": "A fileId (uploads) or a batch id (jobs)."}
UPLOAD_ID = {"name": "uploadId", "in": "query", "required": True, "schema": {"type": "string"},
             "description": "The uploadId mpu-create answered."}


def _action(name: str, what: str) -> dict:
    return {"name": "action", "in": "query", "required": True, "schema": {"type": "string", "enum": [name]},
            "description": what}


def paths(config: Config) -> dict:
    auth = [401] if config.api_key else []
    security = {"security": base.SECURITY} if config.api_key else {}

    def operation(operation_id: str, summary: str, answer, statuses: list[int], parameters: list[dict],
                  **extra) -> dict:
        """`answer`: the 200 answer's schema name, or its content."""
        content = base._json(answer) if isinstance(answer, str) else answer
        responses = {"200": base._response(summary, content),
                     **{str(s): base._response(ERRORS[s], base._json("ErrorBody")) for s in sorted([*statuses, *auth])}}
        return {"operationId": operation_id, "summary": summary, "tags": ["batch"], **security,
                "parameters": parameters, "responses": responses, **extra}

    part_number = {"name": "partNumber", "in": "query", "required": True,
                   "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PART_NUMBER},
                   "description": "The part's place in the file; uploading a number again replaces that part."}
    limit = {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": batch_schemas.LIST_MAX,
                        "default": batch_schemas.LIST_DEFAULT}, "description": "Jobs per page."}
    cursor = {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
              "description": "next_cursor of the previous page."}
    index = {"name": "index", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0},
             "description": "outputs[].index of the job."}
    jsonl = {"application/jsonl": base.streamed({"oneOf": [base._ref("ResultLineOk"), base._ref("ResultLineError")]},
                                                "JSON lines")}
    return {
        "/v1/batch": {
            "post": operation(
                "batch_upload_create", "Start uploading a JSONL batch file: its fileId and uploadId.", "UploadCreated",
                [400], [_action("mpu-create", "Start a multipart upload.")],
                description="Then PUT the file's parts to /v1/batch/{fileId} and complete the upload, which creates "
                            "the job. Each input line: {id?, skill, image (base64), question | object | length, "
                            "reasoning?, settings?, variant?}."),
            "get": operation("batch_list", "Batch jobs, newest first.", "BatchList", [400], [limit, cursor]),
        },
        "/v1/batch/{item_id}": {
            "put": operation(
                "batch_upload_part", "Upload one part of the file: its etag.", "PartUploaded", [400, 404, 413],
                [ITEM_ID, _action("mpu-uploadpart", "Upload a part."), UPLOAD_ID, part_number],
                requestBody={"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}}),
            "post": operation(
                "batch_upload_complete", "Join the parts into the batch file and create its job (chunking).",
                "UploadCompleted", [400, 404], [ITEM_ID, _action("mpu-complete", "Complete the upload."), UPLOAD_ID],
                requestBody={"required": True, "content": base._json("CompleteBody")}),
            "delete": operation("batch_upload_abort", "Drop an upload and its parts.", "UploadAborted", [400, 404],
                                [ITEM_ID, _action("mpu-abort", "Abort the upload."), UPLOAD_ID]),
            "get": operation("batch_get", "A job: status, progress, usage, result files.", "BatchJob", [404], [ITEM_ID]),
        },
        "/v1/batch/{item_id}/cancel": {
            "post": operation("batch_cancel", "Cancel a job: its lines without a result do not run (a finished job "
                              "stays as it is).", "BatchJob", [404], [ITEM_ID]),
        },
        "/v1/batch/{item_id}/results/{index}": {
            "get": operation("batch_results", "A JSONL result file: one result line per input line that has one, "
                             "in input order.", jsonl, [404], [ITEM_ID, index]),
        },
    }
