"""The API's errors: one exception that carries an HTTP status and OpenAI's error body, and the handlers that send it.

Every refusal is an `APIError`, raised wherever it is found and answered as
{"error": {"message", "type", "param", "code"}}. Anything else that escapes an endpoint is a bug of the
server: it is logged and answered 500 in the same body, without a traceback. Messages quote client values
through `show` (short, and safe for any value) and never carry server paths.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import Response

__all__ = ["APIError", "show", "api_error_handler", "server_error_handler"]

log = logging.getLogger("restora.serve")


class APIError(Exception):
    """A request the server refuses or cannot answer: `status` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        message = message if len(message) <= 1000 else message[:997] + "..."
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        # ASCII JSON: a lone surrogate quoted from the client cannot make the error itself fail to encode
        return Response(json.dumps(body), status_code=self.status, headers=self.headers, media_type="application/json")


def show(v: Any) -> str:
    """A client's value for an error message: its repr, at most 60 characters."""
    try:
        r = repr(v)
    except (RecursionError, ValueError):  # deeply nested or a huge integer
        r = f"<{type(v).__name__}>"
    return r if len(r) <= 60 else r[:57] + "..."


async def api_error_handler(request: Request, exc: APIError) -> Response:
    return exc.response()


async def server_error_handler(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered in OpenAI's body without it."""
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__})", type="server_error").response()
