"""Loopback ports for the servers a test session starts besides HAPI: the 18 ports after FHIR_TEST_PORT."""

from __future__ import annotations

import os
import socket

# Each engineer and CI run owns FHIR_TEST_PORT and the 18 ports after it (e.g. 8381 → 8382-8399), so test
# servers of parallel sessions on one machine never meet.
_SPAN = 18


def session_port(offset: int) -> int:
    """A fixed port of the session's range: FHIR_TEST_PORT + `offset` (1 to 18). Servers the tests start by name use
    these (tests/integration: Airflow +2, the receiver +3, the Celery stack +1 to +8; tests/e2e: Airflow +9, the
    receiver +10, the Celery stack +11 to +14; the HAPI server on PostgreSQL +15, its PostgreSQL +16); helpers such as
    the fault proxy bind the first free one."""
    if not 1 <= offset <= _SPAN:
        raise ValueError(f"offset {offset} outside the session's {_SPAN} ports")
    return int(os.environ.get("FHIR_TEST_PORT", "8181")) + offset


def port_range() -> range:
    base = int(os.environ.get("FHIR_TEST_PORT", "8181"))
    return range(base + 1, base + 1 + _SPAN)


def bind_loopback(server_factory):
    """Build a server with `server_factory(("127.0.0.1", port))` on the first free port of the range."""
    last_error: OSError | None = None
    for port in port_range():
        try:
            return server_factory(("127.0.0.1", port))
        except OSError as exc:  # in use: try the next one
            last_error = exc
    raise RuntimeError(f"no free loopback port in {port_range()}: {last_error}")


def is_listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
