"""The HTTP guard in front of the service: API key, body size, and clear answers to bad forms.

BentoML parses the multipart form before an endpoint runs, and some malformed requests make
that parsing fail with a bare 500: a binary file sent in a field of another name (BentoML
tries to read it as JSON text) or an empty multipart body. This ASGI middleware turns such
requests into 4xx answers that say what was wrong:

* with an API key configured (``$BTC_API_KEY``), every path except the health and metrics
  endpoints needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (401 otherwise);
* an upload endpoint needs a ``multipart/form-data`` body (400 when empty, 415 for another
  content type) no larger than its limit (413, checked from ``Content-Length`` and while
  streaming);
* while the body streams through, the form's part headers are read (nothing is buffered).
  A part in a field other than the upload field, or a text part in the upload field, stops
  the request there with a 400 saying so: BentoML would otherwise read a binary file as JSON
  text (500), or take a text value as a URL and download it. If the endpoint answers with
  an error that the form explains (no file, empty form), the guard answers with that.
"""

from __future__ import annotations

import hmac
import os
import re
from typing import Any, Awaitable, Callable

from starlette.responses import JSONResponse

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
_PART_NAME = re.compile(rb'content-disposition:[^\r\n]*?\bname="([^"]*)"([^\r\n]*)', re.IGNORECASE)
_CARRY = 4096  # bytes kept between chunks so a part header split across two chunks is still seen

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _answer(scope: Scope, receive: Receive, send: Send, status: int, message: str, **headers: str) -> None:
    await JSONResponse({"error": message}, status_code=status, headers=headers or None)(scope, receive, send)


class _FormScan:
    """Counts the body's bytes and notes the form's part names as the body streams to the app."""

    def __init__(self, field: str, limit: int):
        self.field, self.limit = field, limit
        self.size = 0
        self.parts: dict[int, tuple[str, bool]] = {}  # offset -> (name, has a filename)
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        start = self.size - len(self._tail)
        window = self._tail + chunk
        for match in _PART_NAME.finditer(window):
            name = match.group(1).decode("utf-8", "replace")
            self.parts[start + match.start()] = (name, b"filename=" in match.group(2).lower())
        self.size += len(chunk)
        self._tail = window[-_CARRY:]

    def refusal(self) -> tuple[int, str] | None:
        """Why the request must stop now, whatever the endpoint would do (None: let it go on)."""
        field = self.field
        if self.size > self.limit:
            return 413, f"request body is over the limit of {self.limit} bytes for this endpoint"
        unexpected = sorted({name for name, _ in self.parts.values() if name != field})
        if unexpected:
            return 400, (f"unexpected form field(s) {', '.join(repr(n) for n in unexpected)}; "
                         f"this endpoint takes the image file(s) in field '{field}'")
        if any(not has_file for name, has_file in self.parts.values() if name == field):
            return 400, f"form field '{field}' must be a file upload (a part with a filename), not text"
        return None

    def diagnosis(self) -> tuple[int, str] | None:
        """Why the endpoint answered with an error, when the form explains it."""
        if (refusal := self.refusal()) is not None:
            return refusal
        if not self.parts:
            return 400, f"the multipart body holds no form fields; send the image file in field '{self.field}'"
        return None


class RequestGuard:
    """ASGI middleware (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        upload_fields: upload path -> the form field that carries the file(s).
        max_body_bytes: upload path -> the largest request body accepted.
        api_key: required key; default ``$BTC_API_KEY`` read when the app is built (none: open).
    """

    def __init__(self, app, *, upload_fields: dict[str, str], max_body_bytes: dict[str, int],
                 api_key: str | None = None):
        self.app = app
        self.upload_fields, self.max_body_bytes = upload_fields, max_body_bytes
        self.api_key = api_key if api_key is not None else (os.environ.get("BTC_API_KEY") or None)

    def _authorised(self, scope: Scope) -> bool:
        bearer = _header(scope, b"authorization") or ""
        offered = bearer[7:].strip() if bearer.lower().startswith("bearer ") else (_header(scope, b"x-api-key") or "")
        return hmac.compare_digest(offered.encode(), self.api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key and path not in OPEN_PATHS and not self._authorised(scope):
            return await _answer(scope, receive, send, 401,
                                 "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                                 **{"WWW-Authenticate": "Bearer"})
        field = self.upload_fields.get(path)
        if field is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes[path]
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        length = _header(scope, b"content-length")
        if not content_type and length in (None, "0"):
            return await _answer(scope, receive, send, 400,
                                 f"empty request: send multipart/form-data with the image file in field '{field}'")
        if content_type != "multipart/form-data":
            return await _answer(scope, receive, send, 415,
                                 f"unsupported content type '{content_type or 'none'}'; "
                                 f"send multipart/form-data with the image file in field '{field}'")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _answer(scope, receive, send, 413,
                                 f"request body is {length} bytes, over the limit of {limit} bytes for this endpoint")
        await self._scan_through(scope, receive, send, _FormScan(field, limit))

    async def _scan_through(self, scope: Scope, receive: Receive, send: Send, scan: _FormScan) -> None:
        replaced = False

        async def scanning_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                scan.feed(message.get("body", b""))
                if scan.refusal() is not None:
                    return {"type": "http.disconnect"}  # stops the app's form parser; we answer instead
            return message

        async def diagnosing_send(message: dict) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and (message["status"] >= 400 or scan.refusal()):
                found = scan.diagnosis()
                if found is not None:
                    replaced = True
                    return await _answer(scope, receive, send, *found)
            if not replaced:
                await send(message)

        await self.app(scope, scanning_receive, diagnosing_send)
