"""What every reader of the normaliser shares: the rules, buckets (skipped, quarantined), caches and JSON helpers."""

from __future__ import annotations

import math
import sys
from collections import Counter
from datetime import datetime, timezone
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from leukofhir.config import Rules
from leukofhir.fhir.references import reference_target

NAT = np.iinfo(np.int64).min  # NaT as int64 nanoseconds: the "no time yet" marker of a compact row
# A subject on another server (an absolute URL under no local base): never the local resource of the same id.
FOREIGN = "<another server>"
_FLOAT_MAX = sys.float_info.max
_MISS = object()
# Per-run caches of repeated strings (subject references, effective times) are cleared past this many entries.
_CACHE_LIMIT = 65536

# Skip and quarantine reasons shared by several kinds of resource.
SKIP_NOT_USED = "resource type not used"
Q_SUBJECT = "subject is not a Patient reference"
Q_SUBJECT_UNRESOLVED = "subject does not resolve to a Patient in the input"
Q_FOREIGN_SUBJECT = "subject refers to another server"


def parse_time_ns(text) -> int | None:
    """FHIR dateTime/instant -> int64 ns UTC; a date or partial date is its first instant; no zone means UTC."""
    if not isinstance(text, str) or len(text) < 4:
        return None
    try:
        if len(text) <= 10:
            parts = text.split("-")
            moment = datetime(
                int(parts[0]),
                int(parts[1]) if len(parts) > 1 else 1,
                int(parts[2]) if len(parts) > 2 else 1,
                tzinfo=timezone.utc,
            )
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
    except (ValueError, IndexError):
        return None
    if not _EARLIEST <= moment <= _LATEST:
        return None  # outside int64 nanoseconds (years 1678-2261): no real clinical time, and would overflow
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


_EARLIEST = datetime(1678, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime(2261, 12, 31, tzinfo=timezone.utc)


def text(value) -> str | None:
    """A JSON value that must be a string: anything else counts as absent (a list is not a status)."""
    return value if isinstance(value, str) else None


def as_list(value) -> list:
    return value if isinstance(value, list) else []


def is_number(value) -> bool:
    """A finite JSON number (not a bool); an int too large for a float is not one (it cannot be converted)."""
    kind = type(value)
    if kind is float:
        return value - value == 0.0  # False for inf and nan
    if kind is int:
        return -_FLOAT_MAX <= value <= _FLOAT_MAX
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return -_FLOAT_MAX <= value <= _FLOAT_MAX if isinstance(value, int) else math.isfinite(value)


def resource_ref(resource: dict) -> str | None:
    """ "Type/id" of a resource, or None without an id."""
    rid = resource.get("id")
    return f"{resource.get('resourceType')}/{rid}" if isinstance(rid, str) and rid else None


def timestamps(ns: np.ndarray) -> pd.DatetimeIndex:
    """int64 ns (NAT marker for none) -> tz-aware UTC timestamps, NaT where there is none."""
    return pd.to_datetime(ns.view("datetime64[ns]"), utc=True)


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def _origin(scheme: str, host: str) -> str:
    """`scheme://host` as compared: lower case, without the scheme's default port (RFC 3986 §6.2.3)."""
    scheme, host = scheme.lower(), host.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default and host.endswith(default):
        host = host[: -len(default)]
    return f"{scheme}://{host}"


def _base_prefix(url: str) -> str:
    """A base URL as the prefix its absolute references start with: the origin as compared, one final "/"."""
    parts = urlsplit(url.strip())
    return f"{_origin(parts.scheme, parts.netloc)}{parts.path.rstrip('/')}/"


class LocalBases:
    """Which absolute references name this server's resources (FHIR R4 §2.3.0.2 "absolute references").

    A reference such as `http://other.example/fhir/Patient/p1` names a resource of another server, and is never the
    local `Patient/p1`. Offline, no base is known: every absolute http(s) URL is another server's unless it starts
    with a base the caller passes. Online, the pipeline passes the FHIR client's base URL. References a Bundle
    resolves through its entries' fullUrl are made relative by the reader before they get here."""

    __slots__ = ("prefixes",)

    def __init__(self, base_url: str | list[str] | tuple[str, ...] | None = None):
        bases = [base_url] if isinstance(base_url, str) else list(base_url or ())
        self.prefixes = tuple(_base_prefix(b) for b in bases if isinstance(b, str) and b.strip())

    def target(self, reference) -> tuple[str | None, str | None] | str:
        """(type, id) of a local reference as `reference_target` reads it; FOREIGN for another server's."""
        if type(reference) is str and "://" in reference:
            scheme, _, rest = reference.partition("://")
            host, slash, path = rest.partition("/")
            normalised = f"{_origin(scheme, host)}{slash}{path}"
            for prefix in self.prefixes:
                if normalised.startswith(prefix):
                    return reference_target(normalised[len(prefix) :])
            return FOREIGN
        return reference_target(reference)


class Context:
    """State shared by the readers of one run: rules, interned strings, caches, patients and the buckets of §"Nothing
    lost" (skipped by reason, quarantined with reasons, resources used whole)."""

    def __init__(self, rules: Rules, base_url=None):
        self.rules = rules
        self.bases = LocalBases(base_url)
        self.strings: dict[str, str] = {}
        self.skipped: Counter = Counter()
        self.quarantined: list[tuple[int, str | None, list[str]]] = []  # (resource index, "Type/id", reasons)
        self.evaluated_other = 0  # resources used whole, outside the row tables (Patients, reports, Medications…)
        self._subjects: dict[str, str | None] = {}  # subject reference -> patient_of's answer
        self._times: dict[str, int | None] = {}  # dateTime text -> ns (results of one panel share a time)

    def intern(self, value):
        if value is None:
            return None
        return self.strings.setdefault(value, value)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def quarantine(self, index: int, resource: dict, *reasons: str) -> None:
        self.quarantined.append((index, resource_ref(resource), list(reasons)))

    def patient_of(self, resource: dict) -> str | None:
        """'Patient/id'; '?id' when the reference has no type (urn:uuid); FOREIGN; None when not a Patient."""
        subject = resource.get("subject")
        reference = subject.get("reference") if isinstance(subject, dict) else None
        if type(reference) is str:
            patient = self._subjects.get(reference, _MISS)
            if patient is _MISS:
                patient = self._patient_of_reference(reference)
                if len(self._subjects) >= _CACHE_LIMIT:
                    self._subjects.clear()
                self._subjects[reference] = patient
            return patient
        return self._patient_of_reference(reference)

    def _patient_of_reference(self, reference) -> str | None:
        target = self.bases.target(reference)
        if target is FOREIGN:
            return FOREIGN
        kind, rid = target
        if not rid or rid.startswith("#"):
            return None
        if kind == "Patient":
            return self.intern(f"Patient/{rid}")
        if kind is None:
            return self.intern(f"?{rid}")
        return None

    def time(self, value) -> int | None:
        """parse_time_ns, remembered: the results of one panel (and its report) carry the same text."""
        if type(value) is not str:
            return parse_time_ns(value)
        ns = self._times.get(value, _MISS)
        if ns is _MISS:
            ns = parse_time_ns(value)
            if len(self._times) >= _CACHE_LIMIT:
                self._times.clear()
            self._times[value] = ns
        return ns

    def effective_ns(self, resource: dict) -> tuple[int | None, bool]:
        """(time, present): the clinically relevant time of §1.1 and whether one was given at all."""
        value = resource.get("effectiveDateTime")
        if value is None:
            value = resource.get("effectiveInstant")
            if value is None:
                period = resource.get("effectivePeriod")
                if isinstance(period, dict) and period.get("start") is not None:
                    return self.time(period["start"]), True
                return None, False
        return self.time(value), True
