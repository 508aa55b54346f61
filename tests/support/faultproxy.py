"""A fault-injecting HTTP proxy on loopback, in front of the real FHIR server: faults without mocking the client."""

from __future__ import annotations

import gzip
import http.client
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from support.ports import bind_loopback

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}


@dataclass
class Fault:
    """What to do to the next request whose method and path match.

    kind: "status" (answer `status` with `headers`/`body` instead of forwarding), "reset" (close the
    connection without answering), "delay" (wait `seconds`, then forward), "late" (forward at once, then wait
    `seconds` before answering: the server has acted, the client may give up first), "hold" (set `arrived`, wait
    until `release` is set, `seconds` at most, then forward: a write held back while another run writes),
    "rewrite" (forward, then
    replace `pattern` with `replacement` in the response body), "gzip" (forward, then send the body gzip-encoded,
    as a server offering compression does), "truncate" (forward, then send the headers and only half the body and
    close: a transfer cut off), "drop" (forward, then close without answering: the server acted, the answer is
    lost)."""

    kind: str
    status: int = 503
    headers: dict = field(default_factory=dict)
    body: str = ""
    seconds: float = 0.0
    pattern: str = ""
    replacement: str = ""
    method: str | None = None
    path_regex: str = ""
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and re.search(self.path_regex, path) is not None


class FaultProxy:
    """`with FaultProxy(upstream_base) as proxy:` then talk to `proxy.base_url`; queue faults with `add()`.

    Every request seen is recorded in `requests` as (method, path, headers) so tests can check what the
    client sent (retries, auth, cache headers). A `gate(method, path, headers)` sees each request first and may
    answer it itself with (status, headers, body) instead of forwarding it (a bearer-token check, say)."""

    def __init__(self, upstream_base: str, gate=None):
        parts = urlsplit(upstream_base)
        self.upstream = (parts.hostname, parts.port or 80)
        self.prefix = parts.path.rstrip("/")
        self.faults: deque[Fault] = deque()
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        self.gate = gate
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    proxy.requests.append((self.command, self.path, dict(self.headers)))
                answer = proxy.gate(self.command, self.path, dict(self.headers)) if proxy.gate else None
                if answer is not None:
                    fault = Fault("status", status=answer[0], headers=answer[1], body=answer[2])
                else:
                    fault = proxy._take(self.command, self.path)
                if fault and fault.kind == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault and fault.kind == "status":
                    payload = fault.body.encode()
                    self.send_response(fault.status)
                    for k, v in fault.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault and fault.kind == "delay":
                    time.sleep(fault.seconds)
                if fault and fault.kind == "hold":
                    fault.arrived.set()
                    fault.release.wait(fault.seconds)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if fault and fault.kind in ("rewrite", "gzip"):
                    headers.pop("Accept-Encoding", None)  # a gzipped body could not be rewritten
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    upstream = conn.getresponse()
                    data = upstream.read()
                except OSError:  # the server is gone (killed): the client sees the connection drop, as without us
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault and fault.kind == "late":
                    time.sleep(fault.seconds)
                if fault and fault.kind == "drop":
                    conn.close()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault and fault.kind == "rewrite":
                    data = re.sub(fault.pattern.encode(), fault.replacement.encode(), data)
                if fault and fault.kind == "gzip":
                    data = gzip.compress(data)
                self.send_response(upstream.status)
                for k, v in upstream.getheaders():
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if fault and fault.kind == "gzip":
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault and fault.kind == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                else:
                    self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self.server = bind_loopback(lambda address: ThreadingHTTPServer(address, Handler))
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}{self.prefix}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _take(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in list(self.faults):
                if fault.matches(method, path):
                    self.faults.remove(fault)
                    return fault
        return None

    def add(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
