"""Errors in OpenAI's shape, with the HTTP status that goes with them.

    raise APIError(400, "max_tokens must be an integer", param="max_tokens")
    → 400 {"error": {"message": …, "type": "invalid_request_error",
                     "param": "max_tokens", "code": null}}

Statuses used: 400 bad field or body, 401 bad key, 404 unknown model or route,
405 wrong method, 413 body or prompt too large, 429 queue full, 500 engine failure,
503 loading or shutting down.
"""

from __future__ import annotations

from typing import Optional

TYPES = {400: "invalid_request_error", 401: "authentication_error",
         404: "not_found_error", 405: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered to the client (module docstring)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_field(param: str, message: str) -> APIError:
    """400 for one request field, the message naming it."""
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")
