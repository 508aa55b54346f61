"""Errors from the FHIR server, carrying the status and the server's OperationOutcome text."""

from __future__ import annotations

import re

from leukofhir.errors import EXIT_AUTH, EXIT_SERVER, LeukofhirError


def outcome_text(body: object) -> str:
    """The human-readable part of an OperationOutcome (diagnostics or details.text of each issue), or ''."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    texts = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
        if text:
            texts.append(f"{issue.get('severity', 'error')}: {text}")
    return "; ".join(texts)


class FhirError(LeukofhirError):
    """A request the server refused or could not answer. `status` is None for network failures."""

    exit_status = EXIT_SERVER

    def __init__(self, message: str, *, status: int | None = None, outcome: dict | None = None, url: str = ""):
        self.status = status
        self.outcome = outcome
        self.url = url
        super().__init__(message)


class TemporaryFhirError(FhirError):
    """Worth retrying later (408, 429, 5xx gateway errors, connection failures): the retry budget ran out."""


class FatalFhirError(FhirError):
    """Retrying will not help (400, 404, 409, 412, 422, ...): the request or the data must change."""


class VersionConflictError(FatalFhirError):
    """The resource moved on since the version the request names in If-Match was read (412; HAPI 8.8 answers 409
    with HAPI-0989): sending it again cannot succeed, the caller reads again and decides again."""


class AuthError(FatalFhirError):
    """401/403 after one re-authorisation: credentials are wrong or lack the scope."""

    exit_status = EXIT_AUTH


class ForeignLinkError(FatalFhirError):
    """A paging link pointing at another origin; following it would send our credentials there."""


class InvalidResponseError(FhirError):
    """An answer the client cannot use whatever it sent (a 200 whose body is not a JSON object, say): the URL is
    probably not a FHIR server, or something between (a login page, a proxy) answers in its place."""


class RedirectError(FhirError):
    """A redirect the client will not follow: to another origin (it would receive the request and its data), or
    of a write (a POST or PUT body must never be re-sent somewhere the caller did not name)."""


class OutcomeUnknownError(FhirError):
    """A request that may already have changed the server lost its answer (timeout, dropped connection, a gateway
    error): repeating it blindly could apply it twice, so the caller decides (a later idempotent run converges)."""


class CapabilityError(FhirError):
    """The server's CapabilityStatement lacks something the pipeline needs; `missing` names each thing."""

    def __init__(self, message: str, *, missing: list[str], url: str = ""):
        self.missing = missing
        super().__init__(message, url=url)


class SmartAuthError(AuthError):
    """The SMART token endpoint refused the client (wrong key, expired or replayed assertion, unknown client,
    scopes not allowed): the message carries the endpoint's own `error` and `error_description`."""


# What of an OperationOutcome may be shown on a terminal or in a log: codes, element paths and the server's message
# ids. Its free text may quote patient data (HAPI: `Invalid attribute value "1970-13-45"`), so it never is.
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}")
_HAPI_ID = re.compile(r"\bHAPI-\d{4}\b")
_ELEMENT = re.compile(r'\[element="([A-Za-z][A-Za-z0-9_.\[\]]{0,100})"\]')
_QUOTED = re.compile(r'"[^"]*"|\'[^\']*\'')
# An element path (Observation.subject, Patient.name[0].family); a FHIRPath function call (`.where(`) ends it.
_PATH = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:\.[a-z][A-Za-z0-9]*+(?:\[\d+\])?(?!\())+")


def outcome_summary(body: object) -> str:
    """Severity, code, element paths and server message ids of each issue of an OperationOutcome, e.g.
    `error processing at birthDate [HAPI-0450, HAPI-1821]`; '' when `body` is none. Never the issue text."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    summaries = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        words = [w for w in (issue.get("severity"), issue.get("code")) if isinstance(w, str) and _TOKEN.fullmatch(w)]
        details = issue.get("details") if isinstance(issue.get("details"), dict) else {}
        for coding in details.get("coding") or []:
            code = coding.get("code") if isinstance(coding, dict) else None
            if isinstance(code, str) and _TOKEN.fullmatch(code):
                words.append(code)
        given = [p for key in ("expression", "location") if isinstance(issue.get(key), list) for p in issue[key]]
        paths = [p for p in given if isinstance(p, str) and _PATH.fullmatch(p)]
        diagnostics = issue.get("diagnostics") if isinstance(issue.get("diagnostics"), str) else ""
        paths += _ELEMENT.findall(diagnostics)
        paths += _PATH.findall(_QUOTED.sub("", diagnostics))
        text = " ".join(words) or "issue"
        if paths:
            text += " at " + ", ".join(dict.fromkeys(paths))
        ids = list(dict.fromkeys(_HAPI_ID.findall(diagnostics)))
        if ids:
            text += f" [{', '.join(ids)}]"
        summaries.append(text)
    return "; ".join(summaries)
