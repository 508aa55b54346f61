"""A hostile HTTP client for the project's services (idle and slow connections, floods, endless chunked bodies, raw
requests sent byte for byte), and what /proc says of the server process: its memory and its open descriptors."""

from __future__ import annotations

import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


@dataclass
class Target:
    """What the hostile-client tests need of one running service process."""

    port: int
    pid: int
    log: Path
    auth: Callable[[], dict[str, str]]  # headers that authorise one request (fresh per call: a JWT's jti is single-use)
    valid: Callable[[], tuple[str, str, bytes]]  # (method, path, body) of a request the service must accept (2xx)
    json_target: tuple[str, str]  # (method, path) where the service parses a JSON body
    scheme: str = "http"
    verify: str | bool = True  # what requests checks its certificate against (https)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_bytes().decode("utf-8", "backslashreplace")


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


@contextmanager
def idle_sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that never send a byte (the kernel completes them even when the server does not accept)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(connect(port))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def request_head(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int | None, bytes]:
    """Send `data` as it is on a new connection; (status, whole answer) once the server answers and closes or
    sends a complete response; status None when it closes without one."""
    with connect(port, timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:  # the server answered and closed before taking all of it
            pass
        return read_response(sock, timeout)


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int | None, bytes]:
    deadline = time.monotonic() + timeout
    received = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:  # reset
            break
        if not chunk:
            break
        received += chunk
        if _complete(received):
            break
    match = re.match(rb"HTTP/1\.[01] (\d{3})", received)
    return (int(match.group(1)) if match else None), received


def _complete(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return length is not None and len(body) >= int(length.group(1))


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"", every: float = 0.5) -> float | None:
    """Seconds until the server closes `sock` (None if it is still open after `seconds`), sending one byte of
    `trickle` every `every` seconds meanwhile (a slowloris); reading, and dropping, whatever the server sends."""
    started = time.monotonic()
    position = 0
    while time.monotonic() - started < seconds:
        sock.settimeout(every)
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - started
        if position < len(trickle):
            try:
                sock.sendall(trickle[position : position + 1])
            except OSError:
                return time.monotonic() - started
            position += 1
    return None


def send_chunked(
    port: int, head: bytes, total: int, chunk: int = 64 * 1024, timeout: float = 60.0
) -> tuple[int | None, int]:
    """A chunked body of `total` bytes after `head` (which says Transfer-Encoding: chunked): (status of the
    answer, bytes of body sent before the server answered or closed)."""
    piece = b"%x\r\n" % chunk + b"[" * chunk + b"\r\n"
    sent = 0
    with connect(port, timeout) as sock:
        sock.sendall(head)
        try:
            while sent < total:
                sock.sendall(piece)
                sent += chunk
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        return read_response(sock, timeout)[0], sent


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident memory now, and at its peak."""
    status = Path(f"/proc/{pid}/status").read_text()
    return tuple(int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) for key in ("VmRSS", "VmHWM"))


def open_descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def wait_for(predicate, timeout: float, every: float = 0.2):
    """The first truthy value of `predicate()` within `timeout` seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for 127.0.0.1, the certificate its own CA: what a test trusts to reach a
    service over https."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "tls-cert.pem", folder / "tls-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file
