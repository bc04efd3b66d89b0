"""Errors as plain exceptions: an HTTP status, a short machine-readable code, a message.

The front end renders them as JSON bodies (frontend/app.py); the batch worker turns
them into error lines.  Nothing here knows about HTTP servers."""
from __future__ import annotations

from typing import Optional

from shared import protocol


class ApiError(Exception):
    """An error with our JSON body: status, a short machine-readable code, a message."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


def broker_error(event: protocol.Error) -> ApiError:
    """An Error event from the pipeline as an ApiError (429/503 say when to come back)."""
    headers = {"Retry-After": "1"} if event.status in (429, 503) else None
    return ApiError(event.status, event.code, event.message, headers)
