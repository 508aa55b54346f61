"""The pieces every HTTP service shares (leukofhir/service), without a server: JSON with its depth bounded, bodies
counted as they arrive, log records a request cannot forge, refusals summarised, the limits and their options.
tests/integration/test_hostile_clients.py holds them against a hostile client over real connections."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from leukofhir.errors import UsageError
from leukofhir.service import limits as service_limits
from leukofhir.service.bodies import BadBody, RequestGuard, parse_json
from leukofhir.service.limits import DESCRIPTOR_RESERVE, Limits, connection_cap
from leukofhir.service.logs import Refusals, SafeRecords, escape_controls


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- JSON -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 64 levels"),  # Python's parser: RecursionError
        (b"[" * 65 + b"]" * 65, "nests deeper than 64 levels"),  # parsed, then measured
        (b'{"a": ' * 65 + b"1" + b"}" * 65, "nests deeper than 64 levels"),
        (b"{not json", "is not JSON"),
        (b"\xff\xfe{}", "is not JSON"),
        (b"\xc3\x28", "is not UTF-8"),
        (b"1" * 5000, "is not JSON"),  # more digits than int() takes
    ],
)
def test_bad_json_is_refused_with_its_reason(body, message):
    with pytest.raises(BadBody, match=message):
        parse_json(body)


def test_json_within_the_depth_is_parsed():
    assert parse_json(b"[" * 64 + b"]" * 64) is not None
    assert parse_json(b'{"resourceType": "Observation", "id": "o1"}') == {"resourceType": "Observation", "id": "o1"}
    assert parse_json(b'"just a string"') == "just a string"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 3 + '"]]]]"' + "]" * 3,  # brackets in a string do not nest
        "[" * 3 + '"\\"[[[["' + "]" * 3,  # nor after an escaped quote
        "[" * 3 + '"\\\\", "[[[["' + "]" * 3,  # an escaped backslash ends its string at the quote
        json.dumps([[["\u00e9[", {"a\\": [1]}]]], ensure_ascii=False),
        json.dumps([[["x"]]]).encode("utf-16").decode("latin-1"),  # UTF-16: json.loads reads it, its value is walked
    ],
)
def test_the_depth_of_a_body_is_its_nesting_whatever_its_strings_hold(text):
    body = text.encode("latin-1") if "\x00" in text else text.encode()
    value = json.loads(body)

    def depth(v):
        return (
            1 + max(map(depth, v.values() if isinstance(v, dict) else v), default=0)
            if isinstance(v, (dict, list))
            else 0
        )

    assert parse_json(body, max_depth=depth(value)) == value
    with pytest.raises(BadBody, match="nests deeper"):
        parse_json(body, max_depth=depth(value) - 1)


# --- bodies -----------------------------------------------------------------------------------------------


def _app() -> FastAPI:
    app = FastAPI()

    @app.put("/echo")
    async def echo(request: Request):
        return {"size": len(await request.body())}

    @app.put("/refuse")
    async def refuse(request: Request):
        return JSONResponse({"detail": "no\r\nforged line"}, status_code=401)

    return app


def _call(guard: RequestGuard, path: str, chunks: list[bytes], headers=(), disconnect_after: int | None = None):
    """Run one request through `guard`; returns (status, headers, body) of the answer (status None: none)."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    if disconnect_after is not None:
        messages = messages[:disconnect_after] + [{"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PUT",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": list(headers),
        "client": ("10.0.0.9", 5000),
        "server": ("127.0.0.1", 8089),
        "scheme": "http",
        "root_path": "",
    }
    asyncio.run(guard(scope, receive, send))
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return (start["status"] if start else None), dict(start["headers"]) if start else {}, body


@pytest.fixture
def refusals():
    log = logging.getLogger("test.refusals")
    return Refusals(log, interval=3600)


def test_a_chunked_body_is_refused_at_the_cap_as_it_arrives(refusals, caplog):
    guard = RequestGuard(_app(), Limits(max_body_bytes=1000), refusals)
    status, headers, body = _call(guard, "/echo", [b"x" * 400] * 10)
    assert status == 413 and json.loads(body) == {"detail": "the body is over 1000 bytes"}
    assert headers[b"connection"] == b"close"  # the rest of the body is never read
    assert guard.buffered == 0
    assert _call(guard, "/echo", [b"x" * 400, b"x" * 600])[0] == 200  # exactly the cap


def test_a_declared_length_over_the_cap_is_refused_before_the_application(refusals):
    app_called = []

    async def app(scope, receive, send):
        app_called.append(scope)

    guard = RequestGuard(app, Limits(max_body_bytes=1000), refusals)
    status, headers, _ = _call(guard, "/x", [b""], headers=[(b"content-length", b"1001")])
    assert status == 413 and headers[b"connection"] == b"close" and app_called == []


def test_the_bodies_in_progress_share_a_budget(refusals):
    guard = RequestGuard(_app(), Limits(max_body_bytes=1000, max_buffered_bytes=1500), refusals)
    guard.buffered = 1000  # another request holds this much
    assert _call(guard, "/echo", [b"x" * 400] * 2)[0] == 503
    assert guard.buffered == 1000


def test_a_client_gone_in_the_middle_of_its_body_is_no_error(refusals, caplog):
    guard = RequestGuard(_app(), Limits(), refusals)
    with caplog.at_level(logging.WARNING):
        status, _, _ = _call(guard, "/echo", [b"x"] * 5, disconnect_after=2)  # no exception escapes
    assert guard.buffered == 0
    assert refusals.total == 0 and "refused" not in caplog.text


def test_an_answer_before_the_body_closes_the_connection_and_is_logged(refusals, caplog):
    guard = RequestGuard(_app(), Limits(), refusals)
    with caplog.at_level(logging.WARNING):
        status, headers, _ = _call(guard, "/refuse", [b"x", b"y"], headers=[(b"transfer-encoding", b"chunked")])
    assert status == 401 and headers[b"connection"] == b"close"
    assert "refused PUT '/refuse' from 10.0.0.9: no\\x0d\\x0aforged line (401)" in caplog.text
    # A request without a body keeps its connection.
    assert b"connection" not in _call(guard, "/refuse", [b""])[1]


# --- logs -------------------------------------------------------------------------------------------------


def test_records_are_one_line_without_control_characters():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SafeRecords())
    log = logging.getLogger("test.safe")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("path %s", "/a\r\n2030-01-01 ERROR forged\x1b[31m\x00\u2028\u202e" + "z" * 5000)
        try:
            raise ValueError("bad\nFORGED line")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("path /a\\x0d\\x0a2030-01-01 ERROR forged\\x1b[31m\\x00\\u2028\\u202e")
    assert lines[0].endswith("(3062 more characters)")
    assert all(not line.startswith(("FORGED", "2030")) for line in lines)
    assert lines[1] == "failed" and all(line.startswith("    ") for line in lines[2:])
    assert escape_controls("a\nb", keep_newlines=True) == "a\nb"


def test_refusals_are_logged_once_per_kind_then_counted(caplog):
    clock = Clock()
    refusals = Refusals(logging.getLogger("test.summary"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.summary"):
        for i in range(300):
            refusals.refused(401, f"PUT '/r{i}' from 10.0.0.9", "no valid shared secret")
        refusals.refused(404, "PUT '/x' from 10.0.0.9", "not ours")
        clock.now += 10.0
        refusals.refused(401, "PUT '/late' from 10.0.0.9", "no valid shared secret")
        refusals.flush()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused PUT '/r0' from 10.0.0.9: no valid shared secret (401)",
        "refused PUT '/x' from 10.0.0.9: not ours (404)",
        "refused 299 more in the last 10 s (401 ×299)",
        "refused PUT '/late' from 10.0.0.9: no valid shared secret (401)",
    ]
    assert refusals.total == 302


def test_the_count_is_logged_when_no_further_refusal_comes(caplog):
    refusals = Refusals(logging.getLogger("test.timer"), interval=0.2)
    with caplog.at_level(logging.WARNING, logger="test.timer"):
        for _ in range(3):
            refusals.refused(408, "a connection from 10.0.0.9", "no whole request head within 10 s")
        time.sleep(0.6)
    assert [r.getMessage() for r in caplog.records][-1] == "refused 2 more in the last 0.2 s (408 ×2)"


# --- limits -----------------------------------------------------------------------------------------------


def test_the_options_give_the_limits():
    parser = argparse.ArgumentParser()
    service_limits.add_arguments(parser)
    limits = service_limits.from_arguments(
        parser.parse_args(["--header-timeout", "3", "--max-connections", "50"]), Limits(max_body_bytes=99)
    )
    assert (limits.header_timeout, limits.body_timeout) == (3, 20)
    assert (limits.max_connections, limits.max_body_bytes) == (50, 99)
    for bad in (["--body-timeout", "0"], ["--keep-alive-timeout", "-1"], ["--max-connections", "0"]):
        with pytest.raises(UsageError):
            service_limits.from_arguments(parser.parse_args(bad))


def test_the_connection_cap_fits_the_descriptor_limit(caplog):
    assert connection_cap(Limits(max_connections=256), 20000) == 256
    with caplog.at_level(logging.WARNING):
        assert connection_cap(Limits(max_connections=256), 256) == 256 - DESCRIPTOR_RESERVE
    assert "lowered to 192" in caplog.text
    with pytest.raises(UsageError, match="LimitNOFILE"):
        connection_cap(Limits(), DESCRIPTOR_RESERVE + 4)
