"""FHIR ids and resource type names, checked before they go anywhere near a URL (FHIR R4 §2.24.0.1, `id`)."""

from __future__ import annotations

import re

from leukofhir.errors import LeukofhirError

__all__ = ["InvalidIdError", "is_valid_id", "is_resource_type", "resource_path", "shown"]

# R4 datatypes: id = [A-Za-z0-9\-\.]{1,64}. Anything else ("victim/_history/1", "evil?_id=victim") would change
# the meaning of the URL it is put in: another resource overwritten, or a search instead of a read. An id of dots only
# fits the pattern but is a dot-segment in a URL (RFC 3986 §5.2.4): clients and servers remove it, so
# `Observation/../_history` reads the whole server's history. No server assigns one; refused too.
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# Resource type names are capitalised ASCII letters (Observation, MedicationStatement).
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")


class InvalidIdError(LeukofhirError, ValueError):
    """An id or a resource type that is not valid FHIR; refused before any request is made."""


def is_valid_id(value) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None and value.strip(".") != ""


def is_resource_type(value) -> bool:
    return isinstance(value, str) and _TYPE.fullmatch(value) is not None


def shown(value, limit: int = 80) -> str:
    """A value from the input as it may appear in a message: quoted, escaped (no control characters), bounded."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resource_path(resource_type, resource_id) -> str:
    """`Type/id` for a URL, or InvalidIdError saying which part is not valid FHIR."""
    if not is_resource_type(resource_type):
        raise InvalidIdError(f"{shown(resource_type)} is not a FHIR resource type")
    if not is_valid_id(resource_id):
        raise InvalidIdError(f"id {shown(resource_id)} is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}}, not dots only)")
    return f"{resource_type}/{resource_id}"
