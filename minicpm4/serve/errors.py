"""OpenAI-style error bodies of the server (issue 5, acceptance 3: every bad input is a 4xx with
a JSON body `{"error": {"message", "type", "param", "code"}}`, never a traceback or a 500)."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    """An HTTP error with an OpenAI error body; raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code,
                          type=self.type)


def error_body(status: int, message: str, *, param: str | None = None,
               code: str | None = None, type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "error"),
                      "param": param, "code": code if code is not None else str(status)}}


def error_bytes(status: int, message: str, **kw: Any) -> bytes:
    return json.dumps(error_body(status, message, **kw)).encode()


_TYPE_TAGS = re.compile(r"^(str|int|float|bool|list|dict|literal|function|union|tagged-union|"
                        r"json-or-python|nullable|constrained-\w+)(\[.*\])?(-.*)?$")


def _field_path(loc: tuple) -> str:
    """`messages.0.content` from a pydantic location, without union-member tags."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or not _TYPE_TAGS.match(str(p)))


def from_validation(exc: ValidationError) -> APIError:
    """400 naming the first offending field, e.g. `messages.0.role: Input should be ...`."""
    errors = exc.errors(include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc), "type": "invalid"}
    loc = _field_path(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON: {first['msg']}", code="invalid_json")
    same_field = [e for e in errors if _field_path(tuple(e.get("loc", ()))) == loc]
    if len(same_field) > 1:  # a union: none of the accepted forms matched
        message = f"{loc or 'body'}: invalid value ({first['msg']}, or one of " \
                  f"{len(same_field) - 1} other accepted forms)"
    else:
        message = f"{loc or 'body'}: {first['msg']}"
    return APIError(400, message, param=loc or None, code="invalid_value")
