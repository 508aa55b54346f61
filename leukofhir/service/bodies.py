"""Request bodies at the edge of a service: counted as they arrive and refused at the cap (chunked ones too), every
refusal logged through the summariser, and JSON parsed with its nesting bounded."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from leukofhir.fhir.ids import shown
from leukofhir.service.limits import Limits
from leukofhir.service.logs import Refusals, cut, escape_controls

_DETAIL_BYTES = 1024  # of a refusal's answer, read for the log line


class BodyRefused(HTTPException):
    """A body refused while it arrives: over the cap (413), or over what all requests in progress may hold
    together (503). An HTTPException, so a Starlette or FastAPI application answers it in its own format;
    RequestGuard answers it for any other ASGI application."""


class BadBody(ValueError):
    """A body that is not what the service expects (answered 400 with this message)."""


def parse_json(body: bytes, max_depth: int = Limits.max_json_depth):
    """The JSON value of `body`, or BadBody: not UTF-8, not JSON, or nested deeper than `max_depth`. Python's
    parser stops at its recursion limit (about 1,000) with a RecursionError, caught here like any bad input;
    the depth of what it returned is then checked without recursion (on the bytes of a UTF-8 body)."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise BadBody(f"the body nests deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise BadBody("the body is not UTF-8") from None
    except ValueError as exc:  # JSONDecodeError, and int() of a number of more than 4,300 digits
        raise BadBody(f"the body is not JSON ({exc})") from None
    if _bytes_deeper_than(body, max_depth) if _is_utf8(body) else _deeper_than(value, max_depth):
        raise BadBody(f"the body nests deeper than {max_depth} levels")
    return value


def _is_utf8(body) -> bool:
    # json.loads reads UTF-16 and UTF-32 bodies too (by their first bytes); only UTF-8 ones are scanned as bytes.
    return (
        isinstance(body, (bytes, bytearray))
        and not (len(body) > 1 and (body[0] == 0 or body[1] == 0))
        and not body.startswith((b"\xff\xfe", b"\xfe\xff"))
    )


_QUOTE = ord('"')
# A whole run of backslashes (from its start: linear, however long) and the quote after it.
_BACKSLASHES_QUOTE = re.compile(rb'(?<!\\)(\\+)"')
_DEPTH_STEP = np.zeros(256, dtype=np.int8)
_DEPTH_STEP[[ord("{"), ord("[")]] = 1
_DEPTH_STEP[[ord("}"), ord("]")]] = -1


def _bytes_deeper_than(body: bytes, limit: int) -> bool:
    """The depth check of a body json.loads has parsed, on its bytes: the brackets outside strings, counted in a few
    C passes (about 5 ms for a 1.2 MB prefetch, where walking the parsed value took 50-90 ms). Exact for valid JSON:
    a bracket is structural unless an odd number of unescaped quotes precede it."""
    data = np.frombuffer(body, dtype=np.uint8)
    brackets = np.flatnonzero(_DEPTH_STEP[data])
    if len(brackets) <= limit:
        return False  # fewer brackets than the limit: cannot nest deeper
    quotes = np.flatnonzero(data == _QUOTE)
    if b'\\"' in body:  # a quote after an odd run of backslashes is escaped: rare, found in one C pass
        odd = [m.end() - 1 for m in _BACKSLASHES_QUOTE.finditer(body) if len(m.group(1)) % 2]
        quotes = np.setdiff1d(quotes, np.array(odd, dtype=quotes.dtype), assume_unique=True)
    outside = np.searchsorted(quotes, brackets) % 2 == 0
    steps = _DEPTH_STEP[data[brackets[outside]]].astype(np.int32)
    return bool(len(steps)) and int(np.cumsum(steps).max()) > limit


def _deeper_than(value, limit: int) -> bool:
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


@dataclass
class _Exchange:
    """One request's state as RequestGuard sees it."""

    what: str
    size: int = 0
    held: int = 0
    complete: bool = False
    gone: bool = False
    status: int = 0
    detail: bytes = b""


class RequestGuard:
    """ASGI middleware around a whole service: a declared Content-Length over the cap is 413 before a byte of the
    body is read; otherwise the body is counted as the application reads it and refused (413) at the cap, and
    refused (503) when the bodies of all requests in progress would exceed their budget. An answer given before
    the body was read to its end closes the connection (the rest is never read). A client that leaves in the
    middle of its body is not an error. Every answer of 400 or more is logged through `refusals`."""

    def __init__(self, app, limits: Limits, refusals: Refusals):
        self.app, self.limits, self.refusals = app, limits, refusals
        self.buffered = 0  # body bytes held by requests in progress

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = _Exchange(_described(scope), complete=not _has_body(scope))

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                state.size += size
                if state.size > self.limits.max_body_bytes:
                    raise BodyRefused(413, f"the body is over {self.limits.max_body_bytes} bytes")
                if self.buffered + size > self.limits.max_buffered_bytes:
                    raise BodyRefused(503, "too many request bodies at once; try again")
                self.buffered += size
                state.held += size
                state.complete = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not state.complete:
                state.gone = True
            return message

        async def guarded_send(message) -> None:
            if message["type"] == "http.response.start":
                state.status = message["status"]
                if not state.complete:
                    message = dict(message, headers=[*message.get("headers", []), (b"connection", b"close")])
            elif message["type"] == "http.response.body" and state.status >= 400 and not state.gone:
                state.detail = (state.detail + message.get("body", b""))[:_DETAIL_BYTES]
                if not message.get("more_body", False):
                    self.refusals.refused(state.status, state.what, _reason(state.detail, state.status))
            await send(message)

        try:
            if _declared_length(scope) > self.limits.max_body_bytes:
                await _answer(guarded_send, 413, f"the body is over {self.limits.max_body_bytes} bytes")
                return
            await self.app(scope, counted_receive, guarded_send)
        except BodyRefused as exc:  # an application that does not answer HTTPException itself
            if not state.status:
                await _answer(guarded_send, exc.status_code, exc.detail)
        except ClientDisconnect:  # gone in the middle of its body (its time-out closed it, or it left)
            pass
        finally:
            self.buffered -= state.held


def _described(scope) -> str:
    path = scope.get("raw_path") or scope.get("path", "").encode()
    client = scope.get("client")
    return f"{scope.get('method', '?')} {shown(path.decode('latin-1'), 200)} from {client[0] if client else '?'}"


def _declared_length(scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit():
            return int(value)
    return 0


def _has_body(scope) -> bool:
    """Whether the request's head announces a body (a Content-Length over 0, or a Transfer-Encoding)."""
    return _declared_length(scope) > 0 or any(name == b"transfer-encoding" for name, _ in scope.get("headers", []))


def _reason(detail: bytes, status: int) -> str:
    """What the answer told the client: FastAPI's {"detail": ...}, or its text."""
    text = detail.decode("utf-8", "replace")
    try:
        value = json.loads(text)
        text = value.get("detail", text) if isinstance(value, dict) else text
    except ValueError:
        pass
    return cut(escape_controls(text if isinstance(text, str) else json.dumps(text)), 300) or str(status)


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
