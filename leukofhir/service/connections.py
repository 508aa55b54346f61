"""Connections of a service, held to deadlines and a cap: what uvicorn does not do itself.

uvicorn 0.54 (httptools) arms its keep-alive time-out only after an answer: a connection that never sends a byte,
or sends its head a byte at a time, or its body a byte a second, stays open for ever, and each holds a descriptor.
Its `limit_concurrency` answers 503 only once a request's head is complete, so idle sockets are never refused.
Here every connection has a deadline (its head within `header_timeout` of opening or of the last answer, its body
within `body_timeout` of the head), the request head is bounded (431), and at most `cap` connections are held:
a newcomer at the cap closes the connection idle the longest (waiting for a head), or is answered 503 when every
connection is busy with a request. TLS is started here, not by the event loop, so that a client that never
finishes its handshake is counted and held to the same deadline."""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import OrderedDict

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from leukofhir.service.limits import Limits
from leukofhir.service.logs import Refusals

WAITING, BODY, BUSY = "waiting for a head", "reading a body", "busy"
_CLOSING = {
    408: b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    503: b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
}


class ConnectionGuard:
    """The open connections of one server, those waiting for a head in the order they began to wait."""

    def __init__(self, limits: Limits, cap: int, refusals: Refusals, ssl_context: ssl.SSLContext | None = None):
        self.limits, self.cap, self.refusals, self.ssl_context = limits, cap, refusals, ssl_context
        self.waiting: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self.busy: set[GuardedProtocol] = set()

    def protocol_factory(self):
        """What uvicorn's `http` setting takes: it calls it as it would its own protocol class."""
        return functools.partial(GuardedProtocol, guard=self)

    def admit(self, conn: GuardedProtocol) -> bool:
        if len(self.waiting) + len(self.busy) >= self.cap:
            if not self.waiting:
                return False
            oldest = next(iter(self.waiting))
            oldest.close(None, "idle the longest when the connection cap was reached", "idle")
        self.waiting[conn] = None
        return True

    def enter(self, conn: GuardedProtocol, state: str) -> None:
        if state == WAITING:
            self.busy.discard(conn)
            self.waiting.pop(conn, None)
            self.waiting[conn] = None  # to the end: it begins to wait now
        else:
            self.waiting.pop(conn, None)
            self.busy.add(conn)

    def forget(self, conn: GuardedProtocol) -> None:
        self.waiting.pop(conn, None)
        self.busy.discard(conn)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline per connection, a bounded head and a place under the cap."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.state = WAITING
        self.head_bytes = 0  # received since the last answer while no head was complete
        self._deadline: asyncio.TimerHandle | None = None
        self._raw: asyncio.Transport | None = None  # before the HTTP layer has it (TLS handshake)
        self._early: list[bytes] = []  # decrypted before the HTTP layer was connected
        self._peer = "?"
        # Admitted, and on the clock, when the event loop makes the protocol as it accepts the socket:
        # connection_made may come a few loop iterations later, and a burst accepted meanwhile must already count.
        self._refused = not guard.admit(self)
        self._gone = self._refused
        if not self._refused:
            self._arm(guard.limits.header_timeout)

    # Connection life

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._raw = transport
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else "?"
        if self._gone:  # refused at the cap, or closed (evicted, timed out) before it got here
            if self._refused:
                self.guard.refusals.refused(
                    503, f"a connection from {self._peer}", f"all {self.guard.cap} connections are busy with requests"
                )
                if self.guard.ssl_context is None:
                    transport.write(_CLOSING[503])
            transport.close()
            return
        if self.guard.ssl_context is None:
            super().connection_made(transport)
        else:
            transport.pause_reading()
            self.loop.create_task(self._start_tls(transport))

    async def _start_tls(self, raw) -> None:
        try:
            tls = await self.loop.start_tls(
                raw,
                self,
                self.guard.ssl_context,
                server_side=True,
                ssl_handshake_timeout=self.guard.limits.header_timeout,
            )
        except (TimeoutError, OSError) as exc:  # its handshake failed (ssl.SSLError is an OSError)
            if not self._gone:  # (a connection closed at its deadline or the cap was logged then)
                self.guard.refusals.refused("TLS", f"a connection from {self._peer}", f"no TLS handshake: {exc}")
            self._lost()
            raw.close()
            return
        if self._gone or tls is None:
            return
        super().connection_made(tls)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def connection_lost(self, exc) -> None:
        self._lost()
        if self.transport is not None:  # the HTTP layer had it: it tells the application, and forgets it
            super().connection_lost(exc)

    def _lost(self) -> None:
        self._gone = True
        self._disarm()
        self.guard.forget(self)

    def close(self, status: int | None, why: str, kind: str = "") -> None:
        """Close the connection now, answering `status` first when it waits for a request; `kind` names the
        refusal in the log when there is no status."""
        if self._gone:
            return
        transport = self.transport or self._raw
        if transport is None:  # made but not yet connected: connection_made will find it gone
            self._lost()
            return
        if status and self.transport is not None and self.state == WAITING:
            transport.write(_CLOSING[status])
        self.guard.refusals.refused(status or kind, f"a connection from {self._peer} {self.state}", why)
        self._lost()
        transport.close()  # connection_lost follows: an application reading the body sees the client gone

    # Bytes and parser events (httptools calls the on_* methods from inside data_received)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:  # decrypted before the TLS handshake's end was seen here
            self._early.append(data)
            return
        super().data_received(data)
        if self.state == WAITING and not self._gone and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > self.guard.limits.max_header_bytes:
                self.close(431, f"a request head over {self.guard.limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._enter(BODY, self.guard.limits.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.cycle is not None and not self.cycle.response_complete:
            self._enter(BUSY, None)  # the application's own time, bounded by its own time-outs

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._gone or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._enter(BUSY, None)  # a pipelined request has started
        else:
            self.head_bytes = 0
            self._enter(WAITING, self.guard.limits.header_timeout)

    # Deadlines

    def _enter(self, state: str, seconds: float | None) -> None:
        if self._gone:
            return
        self.state = state
        self.guard.enter(self, state)
        self._disarm()
        if seconds is not None:
            self._arm(seconds)

    def _arm(self, seconds: float) -> None:
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        limits = self.guard.limits
        if self.state == BODY:
            self.close(None, f"no whole body within {limits.body_timeout:g} s of its head", "slow body")
        elif self.head_bytes:
            self.close(408, f"no whole request head within {limits.header_timeout:g} s")
        else:
            self.close(None, f"no request within {limits.header_timeout:g} s", "idle")
