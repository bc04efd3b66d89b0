"""The MCP server's connection to the service: POST /v1/<skill>, one JSON answer back.

The MCP server is a client of our own HTTP API, like any other: the front end still
validates, authenticates, applies the image and SSRF rules and queues.  Every way a
call can fail ends as a `ServiceError` carrying the service's status, code and message
(or, when the service cannot be reached at all, one of our own).
"""
from __future__ import annotations

from typing import Optional

import httpx2

# 429: the queue or the front end is full; 503: no GPU worker yet (a restart, a model load).
# Both pass by themselves, so an agent may simply call again a little later.
RETRYABLE_STATUSES = frozenset({429, 503})
# The service answers 504 itself after REQUEST_TIMEOUT; we wait a little longer than that.
TIMEOUT_MARGIN_S = 10.0


class ServiceError(Exception):
    """A /v1 call that gave no answer: the service's error, or why it could not be reached."""

    def __init__(self, status: int, code: str, message: str, request_id: Optional[str] = None,
                 retry_after: Optional[str] = None, from_service: bool = True):
        super().__init__(message)
        self.from_service = from_service  # False: our own verdict, with the status the service would give
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES

    def as_dict(self) -> dict:
        """The structured content of the tool error: the service's error body, plus our verdict."""
        body = {"error": {"code": self.code, "message": self.message}, "status": self.status,
                "retryable": self.retryable}
        if self.request_id:
            body["request_id"] = self.request_id
        if self.retry_after:
            body["retry_after"] = self.retry_after
        return body


class Service:
    """An HTTP client of one service endpoint (keep-alive connections, shared by all tool calls)."""

    def __init__(self, endpoint: str, api_key: str, request_timeout: float):
        self.endpoint = endpoint.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx2.Timeout(request_timeout + TIMEOUT_MARGIN_S, connect=10.0)
        self._http = httpx2.AsyncClient(base_url=self.endpoint, headers=headers, timeout=timeout,
                                        follow_redirects=False)

    async def call(self, skill: str, body: dict) -> dict:
        """POST /v1/<skill> -> the answer body; ServiceError otherwise."""
        try:
            response = await self._http.post(f"/v1/{skill}", json=body)
        except httpx2.TimeoutException:
            raise ServiceError(504, "service_timeout", f"the service at {self.endpoint} did not answer in time",
                               from_service=False) from None
        except httpx2.HTTPError as exc:
            raise ServiceError(503, "service_unreachable",
                               f"cannot reach the service at {self.endpoint} ({type(exc).__name__})",
                               from_service=False) from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code == 200 and isinstance(answer, dict):
            return answer
        error = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(error, dict):  # not our front end's JSON (a proxy's page, say)
            raise ServiceError(response.status_code, "unexpected_answer",
                               f"the service answered HTTP {response.status_code} without a JSON error")
        raise ServiceError(response.status_code, str(error.get("code", "error")), str(error.get("message", "")),
                           request_id=answer.get("request_id"), retry_after=response.headers.get("Retry-After"))

    async def aclose(self) -> None:
        await self._http.aclose()
