"""`APIError`: the one exception the HTTP front turns into an error response, an
OpenAI-style error object (``{"error": {"message", "type", "param", "code"}}``).

It sits apart from `sluice.runtime.openai_protocol` (which re-exports it) so that
the optional route sets the server mounts (`sluice.rag.http`) raise the same errors
without importing the server's protocol module.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An HTTP error with an OpenAI-style error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
