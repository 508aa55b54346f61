"""Run an ASGI application as a leukofhir service: uvicorn with the guarded connections and request bodies, the
descriptor limit raised, TLS if asked for, and logs that a request cannot forge."""

from __future__ import annotations

import logging
import ssl

from leukofhir.errors import UsageError
from leukofhir.service.bodies import RequestGuard
from leukofhir.service.connections import ConnectionGuard
from leukofhir.service.limits import Limits, connection_cap, raise_descriptor_limit
from leukofhir.service.logs import Refusals, guard_log_handlers

log = logging.getLogger(__name__)
TLS_BACKLOG = 32  # sockets asyncio accepts at once (see serve); the reserve keeps 64 descriptors, 18 in use at rest


def tls_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later, Python's default ciphers, the certificate chain from PEM files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        key = keyfile or "in the same file"
        raise UsageError(f"cannot use the certificate {certfile} (key {key}): {exc}") from None
    return context


class _CountedRecords(logging.Filter):
    """Records a client can cause once per request, with no rate limit of their own, counted as refusals instead:
    uvicorn's for a request its parser rejects, asyncio's for an accept() refused for want of descriptors (it then
    stops accepting for a second)."""

    def __init__(self, refusals: Refusals):
        super().__init__()
        self.refusals = refusals

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Invalid HTTP request received.":
            self.refusals.refused(400, "a request", "not valid HTTP/1.1")
            return False
        if isinstance(record.msg, str) and record.msg.startswith("socket.accept() out of system resource"):
            self.refusals.refused("EMFILE", "new connections", "no descriptor left; accepting again in 1 s")
            return False
        return True


def serve(
    app,
    *,
    name: str,
    host: str,
    port: int,
    limits: Limits,
    refusals: Refusals,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> None:
    """Serve `app` until stopped (SIGINT/SIGTERM). Refusals are logged through `refusals` (the application
    shares it, so all of a service's refusals are summarised together)."""
    import uvicorn

    context = tls_context(certfile, keyfile) if certfile else None
    descriptors = raise_descriptor_limit()
    cap = connection_cap(limits, descriptors)
    guard = ConnectionGuard(limits, cap, refusals, context)
    guard_log_handlers()
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(_CountedRecords(refusals))
    config = uvicorn.Config(
        RequestGuard(app, limits, refusals),
        host=host,
        port=port,
        http=guard.protocol_factory(),
        ws="none",
        # uvloop 0.23 starts reading a new connection after connection_made even when it paused it there: the
        # ClientHello would reach the HTTP parser before start_tls takes over. asyncio's loop keeps the pause, but
        # accepts up to `backlog` sockets at once before any of them is seen here: bounded below what the
        # descriptor reserve leaves free, or a burst of idle sockets exhausts the descriptors before one is closed.
        loop="asyncio" if context else "auto",
        backlog=TLS_BACKLOG if context else 2048,
        lifespan="on",
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_keep_alive=limits.keep_alive,
        timeout_graceful_shutdown=10,
    )
    log.info(
        "%s on %s://%s:%d: at most %d connections (descriptor limit %d), head within %g s, body within %g s, "
        "bodies up to %d bytes",
        name,
        "https" if context else "http",
        host,
        port,
        cap,
        descriptors,
        limits.header_timeout,
        limits.body_timeout,
        limits.max_body_bytes,
    )
    uvicorn.Server(config).run()
