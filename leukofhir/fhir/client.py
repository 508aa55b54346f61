"""FHIR REST client: one session per server, bounded retries, paging by `link[next]`, transactions."""

from __future__ import annotations

import logging
import os
import re
import ssl
import time
from typing import Any, Callable, Iterator
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.auth import HTTPBasicAuth

from leukofhir.fhir.auth import make_auth
from leukofhir.fhir.errors import (
    AuthError,
    FatalFhirError,
    FhirError,
    ForeignLinkError,
    InvalidResponseError,
    OutcomeUnknownError,
    RedirectError,
    TemporaryFhirError,
    VersionConflictError,
    outcome_summary,
)
from leukofhir.fhir.http import (
    NOT_APPLIED_STATUSES,
    has_precondition,
    is_conditional_write,
    is_temporary,
    is_version_conflict,
    replay_safe,
    retry_delay,
)
from leukofhir.fhir.ids import resource_path
from leukofhir.fhir.urls import redact_url, same_origin, split_userinfo

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
CONNECT_TIMEOUT = 10.0
MAX_REDIRECTS = 5
# A search whose query would make a longer URL goes as POST [type]/_search with a form body (FHIR R4 §3.1.0.1.3):
# servers and proxies commonly refuse request lines above 4-8 KB, and a batch of patients makes long queries.
MAX_GET_QUERY = 2000


def _no_auth(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """Overrides the session's auth for one request (a download the server says needs no token)."""
    return request


def _network_failure(exc: requests.RequestException, read_timeout: float) -> tuple[bool, str]:
    """(was the request sent?, a short reason without any URL). Never-sent failures are safe to retry for any
    method; after a sent one the server may have acted on the request."""
    if isinstance(exc, requests.ConnectTimeout):
        return False, f"no connection within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, requests.ReadTimeout):
        return True, f"no answer within {read_timeout:g} s"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return True, "the answer was cut off"
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        return False, "host name not found"
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        return False, "cannot connect (connection refused or host unreachable)"
    return True, "the connection dropped before the answer"


# OpenSSL's reasons when the answer to its hello is no TLS at all, e.g. a plain-HTTP server's "400 Bad Request":
# "wrong version number" (OpenSSL 1.1 to 3.1), "record layer failure" (3.2 and later), "unknown protocol" (LibreSSL).
_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL"}


def _tls_failure(exc: requests.exceptions.SSLError) -> str:
    """Why TLS failed, said so that the fix is plain: the scheme when the server speaks plain HTTP (an https URL,
    or an Airflow connection without `scheme`, to a plain-HTTP port), else the certificate."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):  # requests → urllib3 (MaxRetryError) → ssl
        inner = getattr(cause, "reason", None) or (cause.args[0] if cause.args else None)
        cause = inner if isinstance(inner, BaseException) else None
    if getattr(cause, "reason", None) in _NOT_TLS:
        return (
            "the server answered plain HTTP, not TLS: use an http:// URL (in an Airflow `fhir` connection, set "
            "the extra `scheme` to `http`, or give the host as http://host:port/path)"
        )
    return "TLS verification failed (the server's certificate is not trusted; a private CA goes in REQUESTS_CA_BUNDLE)"


def _describe_body(response: requests.Response) -> str:
    """A body that is not an OperationOutcome, without its content: its type and size."""
    size = len(response.content or b"")
    if not size:
        return ""
    kind = (response.headers.get("Content-Type") or "no content type").split(";")[0].strip()
    return f"a {kind} answer of {size} bytes, not an OperationOutcome"


def _outcome(response: requests.Response) -> dict | None:
    """The body of an error answer when it is a JSON object (an OperationOutcome, normally), else None."""
    try:
        body: Any = response.json()
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _www_authenticate(response: requests.Response) -> str:
    """RFC 6750 §3: `Bearer error="invalid_token", error_description="…"` says why a token was refused."""
    header = response.headers.get("WWW-Authenticate", "")
    fields = dict(re.findall(r'(error|error_description)="([^"]*)"', header))
    return ": ".join(v for v in (fields.get("error"), fields.get("error_description")) if v)[:200]


class FhirClient:
    """A FHIR R4 server at `base_url`. TLS is always verified (a private CA goes in REQUESTS_CA_BUNDLE).

    Credentials in `base_url` (`https://user:password@host/fhir`) become basic auth and never appear in
    `base_url`, messages or logs; only the server's own origin ever receives a request."""

    def __init__(
        self,
        base_url: str,
        auth: requests.auth.AuthBase | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        base_url, user, password = split_userinfo(base_url.strip())
        if auth is None and user:
            auth = HTTPBasicAuth(user, password or "")
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.sleep = sleep  # injectable, so tests see every wait instead of waiting
        self.session = requests.Session()
        self.session.auth = auth
        self.session.headers.update({"Accept": FHIR_JSON, "User-Agent": "leukofhir"})
        # Retries are ours (status-aware, Retry-After honoured); the adapter only pools connections.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else urljoin(self.base_url, path.lstrip("/"))

    # --- one request ----------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params=None,
        json=None,
        data=None,
        headers=None,
        stream: bool = False,
        authenticate: bool = True,
    ) -> requests.Response:
        """Send one request with the retry policy of `leukofhir.fhir.http`; raise a typed error on failure.

        Retried: temporary statuses (and a 409 from a simultaneous writer, or to a conditional write) and network
        failures, within the budget, each retry logged; a version conflict (412 to an If-Match, HAPI's 409 HAPI-0989)
        is a VersionConflictError at once; a request that may already have changed the server (`replay_safe` is
        False) is not repeated once it was sent. A 401 triggers one re-authorisation (a fresh token) that is not a
        retry. Redirects are followed only for GET/HEAD on the server's own origin. `authenticate=False` sends no
        credentials (a bulk file whose manifest says it needs none, possibly on another origin)."""
        method = method.upper()
        url = self.url(path)
        if authenticate and not same_origin(url, self.base_url):
            raise ForeignLinkError(
                f"refusing to send a request for {self.base_url} to another origin: {redact_url(url)}",
                url=redact_url(url),
            )
        send_headers = dict(headers or {})
        if json is not None:
            send_headers.setdefault("Content-Type", FHIR_JSON)
        body = json if json is not None else data
        safe = replay_safe(method, url, body)
        conditional = is_conditional_write(method, url, body, send_headers)
        preconditioned = has_precondition(send_headers, body)
        attempt, redirects, reauthorised = 0, 0, False
        reasons: list[str] = []
        while True:
            shown = redact_url(self._with_params(url, params))
            try:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    json=json,
                    data=data,
                    headers=send_headers,
                    stream=stream,
                    timeout=(CONNECT_TIMEOUT, self.timeout),
                    allow_redirects=False,
                    **({} if authenticate else {"auth": _no_auth}),
                )
            except requests.exceptions.SSLError as exc:
                raise FhirError(f"{method} {shown}: {_tls_failure(exc)}", url=shown) from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                sent, reason = _network_failure(exc, self.timeout)
                if sent and not safe:
                    raise OutcomeUnknownError(
                        f"{method} {shown}: {reason} after the request was sent; it may or may not have been "
                        "applied, so it is not repeated",
                        url=shown,
                    ) from None
                attempt += 1
                reasons.append(reason)
                if attempt > self.max_retries:
                    raise TemporaryFhirError(
                        f"{method} {shown}: no answer after {attempt} tries ({reason})", url=shown
                    ) from None
                self._wait(method, shown, reason, attempt, None)
                continue
            except requests.RequestException as exc:
                # InvalidURL, InvalidHeader, ...: their text may quote the URL or a header; say only the kind.
                raise FhirError(f"{method} {shown}: request not sent ({type(exc).__name__})", url=shown) from None

            status = response.status_code
            if status < 300 or status == 304:
                if attempt:
                    log.info("%s %s: answered after %d retries (%s)", method, shown, attempt, "; ".join(reasons))
                return response
            if status < 400:
                url, params = self._redirect_target(method, shown, response, redirects), None
                redirects += 1
                continue
            if status == 401 and not reauthorised and hasattr(self.session.auth, "refresh") and authenticate:
                reauthorised = True
                response.close()
                log.info("%s %s: HTTP 401; getting a fresh token (not counted as a retry)", method, shown)
                self.session.auth.refresh()
                continue
            outcome = _outcome(response) if status in (409, 412) else None  # which kind of conflict
            if is_temporary(status, conditional_write=conditional, outcome=outcome):
                if status not in NOT_APPLIED_STATUSES and status != 409 and not safe:
                    raise self._error(
                        method,
                        shown,
                        response,
                        attempt,
                        cls=OutcomeUnknownError,
                        note="it may or may not have been applied, so it is not repeated",
                    )
                attempt += 1
                reasons.append(f"HTTP {status}")
                if attempt <= self.max_retries:
                    response.close()
                    self._wait(method, shown, f"HTTP {status}", attempt, response.headers.get("Retry-After"))
                    continue
            raise self._error(
                method, shown, response, attempt, reauthorised=reauthorised, preconditioned=preconditioned
            )

    def request_json(self, method: str, path: str, *, allow_empty: bool = False, **kwargs) -> dict:
        """`request`, then the body as a JSON object: every JSON answer the client uses is decoded here."""
        response = self.request(method, path, **kwargs)
        return self.decode(response, method, allow_empty=allow_empty)

    def decode(self, response: requests.Response, method: str = "GET", *, allow_empty: bool = False) -> dict:
        """The body of `response` as a JSON object, or InvalidResponseError saying what came instead (a login
        page, a proxy's error) in one line, without quoting it."""
        shown = redact_url(response.url or self.base_url)
        if allow_empty and not response.content:
            return {}
        try:
            body = response.json()
        except (ValueError, RecursionError):
            kind = (response.headers.get("Content-Type") or "no Content-Type").split(";")[0]
            raise InvalidResponseError(
                f"{method} {shown}: HTTP {response.status_code} but the body is not JSON ({kind}, "
                f"{len(response.content)} bytes); is {self.base_url} the FHIR server's base URL?",
                status=response.status_code,
                url=shown,
            ) from None
        if not isinstance(body, dict):
            raise InvalidResponseError(
                f"{method} {shown}: HTTP {response.status_code} but the body is not a JSON object "
                f"(a JSON {type(body).__name__})",
                status=response.status_code,
                url=shown,
            )
        return body

    def _wait(self, method: str, shown: str, reason: str, attempt: int, retry_after: str | None) -> None:
        delay = retry_delay(attempt, retry_after, self.backoff)
        log.warning("%s %s: %s; retry %d of %d in %.1fs", method, shown, reason, attempt, self.max_retries, delay)
        self.sleep(delay)

    def _redirect_target(self, method: str, shown: str, response: requests.Response, redirects: int) -> str:
        """Where a 3xx may be followed: GET/HEAD only, on the server's own origin, a few times at most."""
        response.close()
        location = response.headers.get("Location")
        status = response.status_code
        if not location:
            raise InvalidResponseError(f"{method} {shown}: HTTP {status} without a Location", status=status, url=shown)
        target = urljoin(response.url, location)
        if not same_origin(target, self.base_url):
            where = "{}://{}".format(*urlsplit(redact_url(target))[:2])
            raise RedirectError(
                f"{method} {shown}: HTTP {status} redirect to another origin ({where}) not followed: "
                "it would receive the request",
                status=status,
                url=shown,
            )
        if method not in ("GET", "HEAD"):
            raise RedirectError(
                f"{method} {shown}: HTTP {status} redirect to {redact_url(target)} not followed: "
                "a write is never redirected (its body would go where the caller did not send it)",
                status=status,
                url=shown,
            )
        if redirects >= MAX_REDIRECTS:
            raise RedirectError(f"{method} {shown}: more than {MAX_REDIRECTS} redirects", status=status, url=shown)
        log.info("%s %s: HTTP %d, following to %s", method, shown, status, redact_url(target))
        return target

    @staticmethod
    def _with_params(url: str, params) -> str:
        if not params:
            return url
        return requests.Request("GET", url, params=params).prepare().url or url

    def _error(
        self,
        method: str,
        shown: str,
        response: requests.Response,
        attempt: int,
        *,
        reauthorised: bool = False,
        cls: type[FhirError] | None = None,
        note: str = "",
        preconditioned: bool = False,
    ) -> FhirError:
        body = _outcome(response)
        status = response.status_code
        # Codes, element paths and message ids only: an OperationOutcome's text may quote patient data (the
        # exception keeps the whole outcome, for a rejects file); another body is only described.
        text = outcome_summary(body) or _describe_body(response)
        message = f"{method} {shown}: HTTP {status}" + (f": {text}" if text else "")
        if cls is None:
            if status in (401, 403):
                cls = AuthError
                why = _www_authenticate(response)
                message += (f" ({why})" if why else "") + (" (also with a fresh token)" if reauthorised else "")
            elif is_version_conflict(status, body, preconditioned=preconditioned):
                cls = VersionConflictError
            elif is_temporary(status, outcome=body):
                cls = TemporaryFhirError
                message += f" (gave up after {attempt} retries)"
            else:
                cls = FatalFhirError
        if note:
            message += f"; {note}"
        return cls(message, status=status, outcome=body, url=shown)

    # --- reading --------------------------------------------------------------------------------------

    def capabilities(self) -> dict:
        return self.request_json("GET", "metadata")

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        """The current version of a resource, or None when the server has none (404/410)."""
        try:
            return self.request_json("GET", resource_path(resource_type, resource_id))
        except FatalFhirError as exc:
            if exc.status in (404, 410):
                return None
            raise

    def search_pages(self, resource_type: str, params: dict | None = None) -> Iterator[dict]:
        """Yield each searchset Bundle page, following `link[relation=next]` exactly as the server wrote it.

        `Cache-Control: no-cache` because HAPI otherwise answers a repeated search within 60 s from its cache,
        which would hide resources written in between (incremental reads)."""
        headers = {"Cache-Control": "no-cache"}
        url, page_params = self.url(resource_type), dict(params or {})
        form = None
        if len(urlencode(page_params, doseq=True)) > MAX_GET_QUERY:
            # Same search, same paging links: only the first request carries the query, in its body.
            url, form, page_params = self.url(f"{resource_type}/_search"), page_params, None
        page = 0
        while url:
            if form is not None:
                bundle = self.request_json("POST", url, data=form, headers=headers)
                form = None
            else:
                bundle = self.request_json("GET", url, params=page_params, headers=headers)
            page += 1
            log.info("%s search: page %d, %d entries", resource_type, page, len(bundle.get("entry") or []))
            yield bundle
            url, page_params = None, None
            for link in bundle.get("link") or []:
                if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                    url = link["url"]
            if url and not same_origin(url, self.base_url):
                # Following it would send our Authorization header to someone else.
                raise ForeignLinkError(
                    f"refusing next link to another origin: {urlsplit(redact_url(url)).netloc}", url=redact_url(url)
                )

    def search(self, resource_type: str, params: dict | None = None) -> Iterator[dict]:
        """Yield the matching resources (search.mode `match`; `include`d ones too, `outcome` entries never)."""
        for bundle in self.search_pages(resource_type, params):
            for entry in bundle.get("entry") or []:
                if (entry.get("search") or {}).get("mode") == "outcome":
                    continue
                if "resource" in entry:
                    yield entry["resource"]

    def count(self, resource_type: str, params: dict | None = None) -> int:
        """How many resources match, without fetching them (`_summary=count`)."""
        query = dict(params or {}, _summary="count")
        bundle = self.request_json("GET", resource_type, params=query, headers={"Cache-Control": "no-cache"})
        return int(bundle.get("total", 0))

    # --- writing --------------------------------------------------------------------------------------

    def transaction(self, entries: list[dict]) -> dict:
        """POST a transaction Bundle of `entries` (each with `resource` and `request`); all or nothing."""
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        return self.request_json("POST", "", json=bundle)

    def update(self, resource: dict) -> dict:
        """PUT a resource at its own id (create or update); {} when the server answers without a body."""
        path = resource_path(resource.get("resourceType"), resource.get("id"))
        return self.request_json("PUT", path, json=resource, allow_empty=True)


def connect(base_url: str, auth_kind: str | None = None, *, timeout: float = 60.0, environ=os.environ) -> FhirClient:
    """A client for a base URL and an auth kind given on the command line; every secret from the environment
    (`make_auth`), SMART's token endpoint discovered from the base URL when not given."""
    return FhirClient(base_url, make_auth(auth_kind, base_url=base_url, environ=environ), timeout=timeout)
