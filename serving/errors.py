"""Errors a client can cause, each one a status code, a stable code and a message for people.

Every 4xx and 5xx the server sends has the same JSON body:

    {"error": {"code": "text_too_long", "message": "...", "field": "posts[2].text"},
     "request_id": "..."}

`code` is stable (clients and the `adfilter_errors_total{kind}` metric use it); `message`
says what was wrong and what to send instead; `field` points into the request where it can.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered with `status` and the JSON body above."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self, request_id: str | None) -> dict[str, Any]:
        return {
            "error": {"code": self.code, "message": self.message, "field": self.field},
            "request_id": request_id,
        }


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, size: int | None = None) -> None:
        got = f"{size} bytes" if size is not None else "more than that"
        super().__init__(
            413,
            "body_too_large",
            f"the request body is {got}; the limit is {limit} bytes (serve.max_body_bytes): "
            f"send fewer posts per request or smaller images",
        )


class Overloaded(ApiError):
    def __init__(self, what: str) -> None:
        super().__init__(
            503, "overloaded", f"{what} is full; retry in a moment", headers={"Retry-After": "1"}
        )


class NotReady(ApiError):
    def __init__(self, detail: str) -> None:
        super().__init__(
            503, "model_not_ready", f"no model is loaded yet ({detail}); see GET /readyz",
            headers={"Retry-After": "2"},
        )
