"""FHIR REST client: one session per server, bounded retries, paging by `link[next]`, transactions."""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from leukofhir.fhir.errors import (
    AuthError,
    FatalFhirError,
    ForeignLinkError,
    TemporaryFhirError,
    outcome_text,
)
from leukofhir.fhir.http import is_temporary, retry_delay
from leukofhir.fhir.ids import resource_path

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class FhirClient:
    """A FHIR R4 server at `base_url`. TLS is always verified (a private CA goes in REQUESTS_CA_BUNDLE)."""

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
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._sleep = sleep
        self.session = requests.Session()
        self.session.auth = auth
        self.session.headers.update({"Accept": FHIR_JSON, "User-Agent": "leukofhir"})
        # Retries are ours (status-aware, Retry-After honoured); the adapter only pools connections.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "FhirClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else urljoin(self.base_url, path.lstrip("/"))

    def request(self, method: str, path: str, *, params=None, json=None, headers=None) -> requests.Response:
        """Send one request with the retry policy of `leukofhir.fhir.http`; raise a typed error on failure.

        A 401 triggers one re-authorisation (a refreshed token) that does not count as a retry."""
        url = self.url(path)
        send_headers = dict(headers or {})
        if json is not None:
            send_headers.setdefault("Content-Type", FHIR_JSON)
        attempt = 0
        reauthorised = False
        while True:
            try:
                response = self.session.request(
                    method, url, params=params, json=json, headers=send_headers, timeout=(10, self.timeout)
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                attempt += 1
                if attempt > self.max_retries:
                    raise TemporaryFhirError(
                        f"{method} {url}: no answer after {attempt} tries ({type(exc).__name__})", url=url
                    ) from exc
                delay = retry_delay(attempt, None, self.backoff)
                log.warning("%s %s: %s; retry %d in %.1fs", method, url, type(exc).__name__, attempt, delay)
                self._sleep(delay)
                continue
            status = response.status_code
            if status < 400:
                return response
            if status == 401 and not reauthorised and hasattr(self.session.auth, "refresh"):
                reauthorised = True
                self.session.auth.refresh()
                continue
            if is_temporary(status):
                attempt += 1
                if attempt <= self.max_retries:
                    delay = retry_delay(attempt, response.headers.get("Retry-After"), self.backoff)
                    log.warning("%s %s: HTTP %d; retry %d in %.1fs", method, url, status, attempt, delay)
                    self._sleep(delay)
                    continue
            raise self._error(method, url, response, attempt)

    @staticmethod
    def _error(method: str, url: str, response: requests.Response, attempt: int):
        try:
            body = response.json()
        except ValueError:
            body = None
        text = outcome_text(body) or (response.text or "")[:300].strip()
        message = f"{method} {url}: HTTP {response.status_code}" + (f": {text}" if text else "")
        if response.status_code in (401, 403):
            cls = AuthError
        elif is_temporary(response.status_code):
            cls = TemporaryFhirError
            message += f" (gave up after {attempt} retries)"
        else:
            cls = FatalFhirError
        return cls(message, status=response.status_code, outcome=body, url=url)

    # --- reading --------------------------------------------------------------------------------------

    def capabilities(self) -> dict:
        return self.request("GET", "metadata").json()

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        """The current version of a resource, or None when the server has none (404/410)."""
        try:
            return self.request("GET", resource_path(resource_type, resource_id)).json()
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
        origin = _origin(self.base_url)
        page = 0
        while url:
            bundle = self.request("GET", url, params=page_params, headers=headers).json()
            page += 1
            log.info("%s search: page %d, %d entries", resource_type, page, len(bundle.get("entry") or []))
            yield bundle
            url, page_params = None, None
            for link in bundle.get("link") or []:
                if link.get("relation") == "next" and link.get("url"):
                    url = link["url"]
            if url and _origin(url) != origin:
                # Following it would send our Authorization header to someone else.
                raise ForeignLinkError(f"refusing next link to another origin: {urlsplit(url).netloc}", url=url)

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
        bundle = self.request("GET", resource_type, params=query, headers={"Cache-Control": "no-cache"}).json()
        return int(bundle.get("total", 0))

    # --- writing --------------------------------------------------------------------------------------

    def transaction(self, entries: list[dict]) -> dict:
        """POST a transaction Bundle of `entries` (each with `resource` and `request`); all or nothing."""
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        return self.request("POST", "", json=bundle).json()

    def update(self, resource: dict) -> dict:
        """PUT a resource at its own id (create or update)."""
        path = resource_path(resource.get("resourceType"), resource.get("id"))
        return self.request("PUT", path, json=resource).json()
