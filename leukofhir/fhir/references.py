"""FHIR references read one way: the (type, id) a reference names, and the core extension a Flag names its evidence
with (a reference in `valueReference`)."""

from __future__ import annotations

__all__ = ["DETAIL_URL", "reference_target"]

# The core extension `flag-detail` (FHIR R4): each of a Flag's evidence resources, and the drugs it names.
DETAIL_URL = "http://hl7.org/fhir/StructureDefinition/flag-detail"


def reference_target(reference: str | None) -> tuple[str | None, str | None]:
    """Split a reference into (type, id): `Patient/1`, `http://x/fhir/Patient/1/_history/2` or `urn:uuid:x`.

    A `urn:uuid:` reference names no type (Synthea NDJSON uses them with the target's id), so type is None.
    """
    if not reference or not isinstance(reference, str):
        return None, None
    if reference.startswith("urn:uuid:") or reference.startswith("urn:oid:"):
        return None, reference.split(":", 2)[2]
    if reference.startswith("#"):
        return None, reference
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2], parts[-1]
    return None, parts[-1]
