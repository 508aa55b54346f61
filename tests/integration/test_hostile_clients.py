"""Every HTTP service of the project against a hostile client, as its own process with a descriptor limit of 256:
idle and slow connections, floods of headers, endless chunked bodies, deep JSON, control characters for the log,
refusals by the hundred. Each service is one entry of SERVICES (tests/support/hostile.py says what it provides)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from leukofhir.service.limits import DESCRIPTOR_RESERVE, Limits
from support.cds_process import cds_service
from support.hostile import (
    closed_within,
    connect,
    exchange,
    idle_sockets,
    memory_kib,
    open_descriptors,
    request_head,
    self_signed_certificate,
    send_chunked,
    wait_for,
)
from support.listen_process import listen_service
from support.ports import session_port

# A service process of its own (make test runs it; make test-unit does not).
pytestmark = pytest.mark.service

# One line per service. Each is called as `manager(workdir, port, nofile=N, tls=(certificate, key) or None)` and yields
# a support.hostile.Target.
SERVICES = {"listen": listen_service, "cds-hooks": cds_service}
NOFILE = 256
# The defaults of every service (leukofhir/service/limits.py), which these tests hold them to.
HEADER_TIMEOUT, BODY_TIMEOUT, SLACK = Limits().header_timeout, Limits().body_timeout, 5.0
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@pytest.fixture(params=sorted(SERVICES))
def service(request, tmp_path):
    with SERVICES[request.param](tmp_path, session_port(15), nofile=NOFILE) as target:
        yield target


def _valid(service, timeout: float = 5.0) -> int:
    method, path, body = service.valid()
    headers = dict(service.auth(), **{"Content-Type": "application/fhir+json"})
    return requests.request(
        method, service.url + path, data=body, headers=headers, timeout=timeout, verify=service.verify
    ).status_code


def _accepted_within(service, seconds: float) -> bool:
    def attempt():
        try:
            return 200 <= _valid(service, timeout=2.0) < 300
        except requests.RequestException:
            return False

    return bool(wait_for(attempt, seconds, every=0.1))


def test_idle_sockets_do_not_lock_out_a_real_request(service):
    with idle_sockets(service.port, 300):
        assert _accepted_within(service, 5.0), "a real request was not accepted while 300 idle sockets were open"
        assert open_descriptors(service.pid) < NOFILE
    assert _valid(service) in (200, 201)
    assert "Too many open files" not in service.log_text()


def test_slow_clients_are_cut_off(service):
    """Nothing sent at all, headers a byte at a time, a body a byte a second: each holds a descriptor, so each
    is closed at its deadline (the three run at once)."""
    head = request_head("PUT", "/notify/Observation/slow", dict(service.auth(), **{"Content-Length": "1000"}))
    cases = {
        "idle": (b"", HEADER_TIMEOUT),
        "slowloris": (b"PUT /notify/Observation/x HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200, HEADER_TIMEOUT),
        "slow body": (b"{" * 1000, BODY_TIMEOUT),
    }
    sockets = {name: connect(service.port) for name in cases}
    sockets["slow body"].sendall(head)
    with ThreadPoolExecutor(len(cases)) as pool:
        closed = {
            name: pool.submit(closed_within, sockets[name], limit + SLACK, trickle, 1.0)
            for name, (trickle, limit) in cases.items()
        }
        closed = {name: future.result() for name, future in closed.items()}
    for sock in sockets.values():
        sock.close()
    assert all(closed.values()), f"still open at the deadline: {closed}"
    assert _valid(service) in (200, 201)
    assert "Traceback" not in service.log_text()


def test_a_flood_of_headers_is_refused(service):
    peak_before = memory_kib(service.pid)[1]
    status, _ = exchange(service.port, b"PUT /x HTTP/1.1\r\nHost: x\r\nX-Flood: " + b"a" * (8 * 1024 * 1024))
    assert status == 431
    assert memory_kib(service.pid)[1] - peak_before < 4 * 1024


def test_a_chunked_body_over_the_cap_is_refused_as_it_arrives(service):
    method, path = service.json_target
    assert _valid(service) in (200, 201)  # warm: the first request's own allocations are not the body's
    peak_before = memory_kib(service.pid)[1]
    head = request_head(
        method, path, dict(service.auth(), **{"Transfer-Encoding": "chunked", "Content-Type": "application/json"})
    )
    status, sent = send_chunked(service.port, head, 50 * 1024 * 1024)
    peak_after = memory_kib(service.pid)[1]
    assert status == 413
    assert sent < 50 * 1024 * 1024, "the server read the whole body before refusing it"
    assert peak_after - peak_before < 12 * 1024, f"peak RSS {peak_before} -> {peak_after} KiB"
    # A Content-Length over the cap is refused before a byte of the body is read.
    big = request_head(method, path, dict(service.auth(), **{"Content-Length": str(50 * 1024 * 1024)}))
    assert exchange(service.port, big)[0] == 413


def test_json_nested_100000_deep_is_a_400(service):
    method, path = service.json_target
    deep = b"[" * 100_000 + b"]" * 100_000
    headers = dict(service.auth(), **{"Content-Length": str(len(deep)), "Content-Type": "application/json"})
    status, answer = exchange(service.port, request_head(method, path, headers) + deep)
    assert status == 400, answer[:500]
    assert b"deep" in answer
    log = service.log_text()
    assert "Traceback" not in log and "RecursionError" not in log
    assert _valid(service) in (200, 201)


def test_no_control_character_from_a_request_reaches_the_log(service):
    # A carriage return starting a forged record, ANSI escapes (clear the screen, red) and a NUL, a line feed, a
    # Unicode line separator; in the last segment, in the middle, alone.
    forged = [
        "x%0D2030-01-01 00:00:00,000 ERROR forged",
        "x%1B[2J%1B[31mred%00nul",
        "x%0A2030-01-01 forged",
        "x%E2%80%A82030-01-01 forged",
    ]
    paths = [p for f in forged for p in (f"/notify/Observation/{f}", f"/notify/{f}/Observation/x", f"/{f}")]
    for headers in ({}, service.auth()):  # refused before the secret is checked, and after
        for path in paths + ["/notify/Observation/" + "a" * 60_000]:
            status, _ = exchange(service.port, request_head("PUT", path, dict(headers, **{"Content-Length": "0"})))
            assert status is not None and 400 <= status < 500, (path[:80], status)
    log = service.log_text()
    assert not CONTROL.search(log), CONTROL.search(log)
    assert "\u2028" not in log
    assert not re.search(r"(?m)^2030-01-01", log), "a forged line"
    assert max(len(line) for line in log.splitlines()) < 2_500
    assert "a" * 2_000 not in log


def test_repeated_refusals_are_summarised(service):
    with requests.Session() as session:
        statuses = [
            session.put(f"{service.url}/notify/Observation/r{i}", data=b"{}", timeout=10).status_code
            for i in range(300)
        ]
    assert set(statuses) == {401}
    summary = wait_for(lambda: re.search(r"refused (\d+) more in the last 10 s \(401 ×\d+\)", service.log_text()), 15.0)
    assert summary, service.log_text()[-2000:]
    log = service.log_text()
    refused_lines = [line for line in log.splitlines() if "refused" in line]
    assert len(refused_lines) <= 3, refused_lines[:5]
    assert int(summary.group(1)) == 299


def test_a_full_house_of_busy_connections_answers_503(service, tmp_path):
    """When every connection the service may hold is busy with a request, a newcomer is answered 503 at once;
    an idle connection is closed to make room instead."""
    cap = NOFILE - DESCRIPTOR_RESERVE  # the connections the service holds (the rest of its descriptors are its own)
    method, path = service.json_target
    head = request_head(method, path, dict(service.auth(), **{"Content-Length": "1000"}))
    busy = []
    try:
        for _ in range(cap):
            sock = connect(service.port)
            sock.sendall(head + b"{")
            busy.append(sock)
        time.sleep(1.0)  # until the service has read every request's head: only then is each one busy
        method, path, body = service.valid()
        headers = dict(service.auth(), **{"Content-Length": str(len(body))})
        status, _ = exchange(service.port, request_head(method, path, headers) + body, timeout=5.0)
        assert status == 503
    finally:
        for sock in busy:
            sock.close()
    assert _accepted_within(service, 5.0)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_over_tls_an_unfinished_handshake_holds_nothing(name, tmp_path):
    """With the built-in TLS, a socket that never starts its handshake is held to the head's deadline and counted
    under the cap like any other: idle sockets lock no one out over https either."""
    tls = self_signed_certificate(tmp_path)
    with SERVICES[name](tmp_path, session_port(15), nofile=NOFILE, tls=tls) as service:
        assert _valid(service) in (200, 201)
        with connect(service.port) as sock:
            assert closed_within(sock, HEADER_TIMEOUT + SLACK)
        with idle_sockets(service.port, 300):
            assert _accepted_within(service, 5.0)
            assert open_descriptors(service.pid) < NOFILE
        assert "Traceback" not in service.log_text()
