"""URLs of the FHIR server: origin checks, credentials kept out of base URLs, and the one redaction for display."""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

from leukofhir.errors import UsageError

# Query parameters whose values are secrets wherever they appear (OAuth, signed download links such as S3's).
# FHIR search parameters (code, subject, identifier, ...) are not secrets and stay readable.
_SECRET_PARAM = re.compile(
    r"^(x-amz-.*|x-goog-.*|.*(token|secret|password|passwd|signature|credential|assertion|apikey|api_key)|sig|key)$",
    re.IGNORECASE,
)
REDACTED = "***"


def redact_url(url: str) -> str:
    """`url` fit to show in a message or a log line: userinfo (`user:password@`) and secret query values replaced
    by ***. Every URL the client, `load`, `export` and the CLI show goes through here."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
        query = "&".join(_redact_param(piece) for piece in parts.query.split("&")) if parts.query else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # unparseable (e.g. a bad port): show nothing of it rather than a secret
        return "<unparseable URL>"


def _redact_param(piece: str) -> str:
    name, eq, _ = piece.partition("=")
    return f"{name}={REDACTED}" if eq and _SECRET_PARAM.match(unquote_plus(name)) else piece


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: two URLs of one origin may share credentials."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def same_origin(a: str, b: str) -> bool:
    return origin(a) == origin(b)


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without `user:password@`, user, password), percent-decoded as RFC 3986 §3.2.1 encodes them."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, hostport = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, unquote(user), (unquote(password) if ":" in userinfo else None)


def check_base_url(value: str, *, allow_userinfo: bool = False) -> str:
    """A FHIR base URL as given by a user: http(s), a host, no query or fragment; credentials refused unless
    `allow_userinfo` (the command line never takes them: other users see argv). Messages show it redacted."""
    shown = redact_url(value)
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise UsageError(f"{shown} is not a usable URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{shown} is not an http(s) URL with a host (e.g. https://fhir.hospital.example/fhir)")
    if parts.query or parts.fragment:
        raise UsageError(f"{shown}: a FHIR base URL has no query or fragment")
    if "@" in parts.netloc and not allow_userinfo:
        raise UsageError(
            f"{shown} carries credentials, and a command line is visible to other users of the machine: use "
            "--auth basic with LEUKOFHIR_FHIR_USER and LEUKOFHIR_FHIR_PASSWORD (or *_FILE) instead"
        )
    return value.strip()


def base_url_from_parts(
    host: str | None, port: int | None = None, path: str | None = None, scheme: str | None = None
) -> str:
    """A base URL from an Airflow connection's fields: `host` is a host name (maybe with a path), or a whole base
    URL as in Airflow's HTTP provider; `port` and `path` (the connection's schema field) are added when the host
    does not already give them; `scheme` (from extra) defaults to https, so a bare host never means plain HTTP."""
    host = (host or "").strip()
    if not host:
        raise UsageError("the connection has no host (the FHIR server's host name or base URL)")
    if "://" in host:
        parts = urlsplit(host)
        if scheme and scheme != parts.scheme:
            raise UsageError(f"the connection's host says {parts.scheme}:// but its extra says scheme {scheme!r}")
        scheme, rest = parts.scheme, host.split("://", 1)[1]
    else:
        scheme, rest = (scheme or "https"), host
    if scheme not in ("http", "https"):
        raise UsageError(f"scheme {scheme!r} is not http or https")
    hostport, _, host_path = rest.partition("/")
    if port and ":" not in hostport.rsplit("@", 1)[-1].rsplit("]", 1)[-1]:
        hostport = f"{hostport}:{int(port)}"
    host_path = host_path.strip("/")
    path = (path or "").strip("/")
    if host_path and path and host_path != path:
        raise UsageError(f"the connection gives two paths: /{host_path} in host and /{path} in schema")
    full_path = quote(host_path or path, safe="/%:@$")
    return check_base_url(f"{scheme}://{hostport}/{full_path}".rstrip("/"), allow_userinfo=True)
