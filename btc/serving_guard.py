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
* while the body streams through, python-multipart's streaming parser (the one Starlette,
  and so BentoML, parses the form with) reads the part headers; nothing is buffered, and
  bytes inside a file that look like a header are file bytes, not a part. A part in a field
  other than the upload field, a text part in the upload field, a second file where the
  endpoint takes one, or a body that is not valid multipart stops the request there with a
  400 saying so: BentoML would otherwise read a binary file as JSON text (500), take a text
  value as a URL and download it, or answer the first file and silently drop the others.
  A body that ends before the form's closing boundary is refused too (400): Starlette keeps
  the parts it finished and drops an unclosed last part without a word, so a batch would be
  answered short of a file;
* the media type of the ``Content-Type`` the app sees is lower-cased (the boundary and the
  other parameters are passed on as sent): media types are case-insensitive, but BentoML
  picks its body parser by the exact header text and would read ``Multipart/Form-Data`` as JSON.

If the endpoint answers with an error that the form explains (no file, empty form), the guard
answers with that.
"""

from __future__ import annotations

import hmac
import os
import posixpath
from typing import Any, Awaitable, Callable

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.responses import JSONResponse

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _with_lowercase_media_type(scope: Scope) -> Scope:
    """The scope with the ``Content-Type`` media type lower-cased and its parameters kept byte for byte.

    RFC 9110 makes the type and subtype case-insensitive, but BentoML chooses how to parse the body
    by the exact header text (``Multipart/Form-Data`` is read as JSON), and the boundary value is
    case-sensitive, so only the part before the first ``;`` changes.
    """
    def normal(value: bytes) -> bytes:
        media_type, semicolon, parameters = value.partition(b";")
        return media_type.strip().lower() + semicolon + parameters

    headers = [(key, normal(value) if key.lower() == b"content-type" else value)
               for key, value in scope.get("headers", [])]
    return scope if headers == list(scope.get("headers", [])) else {**scope, "headers": headers}


async def _answer(scope: Scope, receive: Receive, send: Send, status: int, message: str, **headers: str) -> None:
    await JSONResponse({"error": message}, status_code=status, headers=headers or None)(scope, receive, send)


# BentoML stores each upload in a temporary file whose name ends with the client's file name;
# most file systems allow 255 bytes a name, so a longer one would be a 500 for the whole request.
MAX_FILENAME_BYTES = 200


class _FormScan:
    """Counts the body's bytes and reads the form's part headers as the body streams to the app.

    Args:
        field: the form field that carries the upload(s).
        limit: the largest body accepted, in bytes.
        boundary: the multipart boundary, from the request's ``Content-Type``.
        one_file: what to tell a client that sent several files where the endpoint takes one
            (None: several files are fine).
    """

    def __init__(self, field: str, limit: int, boundary: bytes, one_file: str | None = None):
        self.field, self.limit, self.one_file = field, limit, one_file
        self.size = 0
        self.parts: list[tuple[str | None, bool]] = []  # (field name, None without one; has a filename)
        self.malformed: str | None = None
        self.long_name: tuple[str, int] | None = None  # the first file name over MAX_FILENAME_BYTES, its length
        self._header_name = self._header_value = self._disposition = b""
        self._boundary = boundary
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished})

    def _on_part_begin(self) -> None:
        self._disposition = b""

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        # Starlette's rule: the part is a file exactly when its Content-Disposition has a filename.
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        self.parts.append((None if name is None else name.decode("utf-8", "replace"), b"filename" in options))
        # The name as the temporary file will carry it: Starlette decodes it as UTF-8, else Latin-1, and
        # BentoML keeps its POSIX basename (a backslash stays); the file system counts UTF-8 bytes.
        raw = options.get(b"filename", b"")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        filename = posixpath.basename(text)
        size = len(filename.encode("utf-8", "surrogatepass"))
        if size > MAX_FILENAME_BYTES and self.long_name is None:  # BentoML's temporary file takes the name
            self.long_name = filename, size

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.malformed is not None or self.size > self.limit:
            return  # the request is refused already: no need to read on
        try:
            self._parser.write(chunk)
        except FormParserError as err:
            self.malformed = str(err)

    def finish(self) -> None:
        """The body has ended: it must have reached the form's closing boundary.

        python-multipart does not check this (its ``finalize`` is a no-op) and Starlette drops a
        part still open at the end, so a batch cut short, or sent without ``--boundary--``, would be
        answered without its last file. An empty body is left to :meth:`diagnosis` (no form fields).
        """
        if self.size == 0 or self._parser.state == MultipartState.END or self.refusal() is not None:
            return
        closing = "--" + self._boundary.decode("latin-1") + "--"
        self.malformed = (f"it ends before the closing boundary '{closing}': a part is cut off or the form "
                          "is not closed")

    def refusal(self) -> tuple[int, str] | None:
        """Why the request must stop now, whatever the endpoint would do (None: let it go on)."""
        field = self.field
        if self.size > self.limit:
            return 413, f"request body is over the limit of {self.limit} bytes for this endpoint"
        if self.malformed is not None:
            return 400, (f"the body is not valid multipart/form-data ({self.malformed}); "
                         f"send the image file in field '{field}'")
        if any(name is None for name, _ in self.parts):
            return 400, (f"a form part has no field name in its Content-Disposition header; "
                         f"send the image file in field '{field}'")
        unexpected = sorted({name for name, _ in self.parts if name != field})
        if unexpected:
            return 400, (f"unexpected form field(s) {', '.join(repr(n) for n in unexpected)}; "
                         f"this endpoint takes the image file(s) in field '{field}'")
        if any(not has_file for _, has_file in self.parts):
            return 400, f"form field '{field}' must be a file upload (a part with a filename), not text"
        if self.long_name is not None:
            return 400, (f"file name {self.long_name[0][:40]!r}... is {self.long_name[1]} bytes long; "
                         f"at most {MAX_FILENAME_BYTES} bytes are accepted: rename the file")
        if self.one_file is not None and len(self.parts) > 1:
            return 400, (f"{len(self.parts)} files sent in field '{field}'; this endpoint takes one file "
                         f"per request; {self.one_file}")
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
        one_file: upload path that takes one file per request -> what to tell a client that sent
            several (e.g. which endpoint takes them).
        api_key: required key; default ``$BTC_API_KEY`` read when the app is built (none: open).
    """

    def __init__(self, app, *, upload_fields: dict[str, str], max_body_bytes: dict[str, int],
                 one_file: dict[str, str] | None = None, api_key: str | None = None):
        self.app = app
        self.upload_fields, self.max_body_bytes = upload_fields, max_body_bytes
        self.one_file = one_file or {}
        key = api_key if api_key is not None else os.environ.get("BTC_API_KEY", "")
        # A header value carries no surrounding white space, so a key read from a file with its newline
        # could never be sent: it is stripped the same way.
        self.api_key = key.strip() or None

    def _authorised(self, scope: Scope) -> bool:
        bearer = _header(scope, b"authorization") or ""
        offered = bearer[7:].strip() if bearer.lower().startswith("bearer ") else (_header(scope, b"x-api-key") or "")
        # Compared as bytes: the header's raw bytes (read as Latin-1 above) against the key's UTF-8.
        return hmac.compare_digest(offered.strip().encode("latin-1"), self.api_key.encode("utf-8"))

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
        content_type, options = parse_options_header(_header(scope, b"content-type") or "")
        content_type = content_type.decode("latin-1").lower()
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
        boundary = options.get(b"boundary")
        if not boundary:
            return await _answer(scope, receive, send, 400,
                                 "multipart/form-data without a boundary in the Content-Type header; "
                                 f"send the image file in field '{field}' with a client that writes the form")
        await self._scan_through(_with_lowercase_media_type(scope), receive, send,
                                 _FormScan(field, limit, boundary, self.one_file.get(path)))

    async def _scan_through(self, scope: Scope, receive: Receive, send: Send, scan: _FormScan) -> None:
        replaced = False

        async def scanning_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                scan.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    scan.finish()
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
