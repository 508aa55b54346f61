"""What the server supports: its CapabilityStatement read once and checked against what a run needs, before
anything is read or written; everything missing is named in one error."""

from __future__ import annotations

import logging
from typing import Iterable

from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import CapabilityError
from leukofhir.fhir.urls import redact_url

log = logging.getLogger(__name__)

# Searches the pipeline makes, per resource type: each tuple is one need, met by any of its parameters
# (`subject` or `patient` find a patient's resources alike). Common parameters (_lastUpdated, _tag) may be
# listed per resource or once for all resources (CapabilityStatement.rest.searchParam); both count. The daily lapse
# sweep (leukofhir.extract.sweep) finds open Flags by `date` and reads their evidence by `_id`.
REQUIRED_SEARCH: dict[str, list[tuple[str, ...]]] = {
    "Observation": [("code",), ("subject", "patient"), ("_lastUpdated",), ("date",), ("_id",)],
    "DiagnosticReport": [("subject", "patient"), ("_lastUpdated",)],
    "MedicationRequest": [("subject", "patient"), ("_lastUpdated",)],
    "MedicationStatement": [("subject", "patient"), ("_lastUpdated",)],
    "MedicationAdministration": [("subject", "patient"), ("_lastUpdated",)],
    "Patient": [("_id",)],
    "Flag": [("identifier",), ("_tag",), ("subject", "patient"), ("date",)],
}
# $export levels and where the Bulk Data IG has servers declare them.
EXPORT_LEVELS = {"system": None, "patient": "Patient", "group": "Group"}


def _server_rest(statement: dict) -> dict:
    for rest in statement.get("rest") or []:
        if isinstance(rest, dict) and rest.get("mode") == "server":
            return rest
    return {}


def _names(items) -> set[str]:
    return {str(i.get("name") or i.get("code")) for i in items or [] if isinstance(i, dict)}


def missing_capabilities(
    statement: dict,
    *,
    need_export: bool | str = False,
    resource_types: Iterable[str] | None = None,
    write_flags: bool = True,
    history_types: Iterable[str] = (),
) -> list[str]:
    """Each thing the CapabilityStatement does not declare, in words (empty when everything is there)."""
    missing: list[str] = []
    version = str(statement.get("fhirVersion") or "")
    if not version.startswith("4.0."):
        missing.append(f"FHIR R4 (4.0.x); the server declares fhirVersion {version or 'nothing'}")
    rest = _server_rest(statement)
    if not rest:
        return missing + ["a rest entry in server mode (the CapabilityStatement declares no REST API)"]
    resources = {r.get("type"): r for r in rest.get("resource") or [] if isinstance(r, dict)}
    common = _names(rest.get("searchParam"))
    types = list(REQUIRED_SEARCH) if resource_types is None else list(resource_types)
    for rtype in types:
        resource = resources.get(rtype)
        if resource is None:
            missing.append(f"{rtype} (not among the server's resources)")
            continue
        interactions = _names(resource.get("interaction"))
        if "search-type" not in interactions:
            missing.append(f"search on {rtype}")
        params = _names(resource.get("searchParam")) | common
        for need in REQUIRED_SEARCH.get(rtype, []):
            if not params & set(need):
                missing.append(f"search {rtype} by {' or '.join(need)}")
    for rtype in history_types:
        # Results deleted since a window began are found in the type's history (extract.search.deleted_subjects).
        if "history-type" not in _names((resources.get(rtype) or {}).get("interaction")):
            missing.append(f"history of {rtype} ({rtype}/_history, which lists deletions)")
    if write_flags and (resource_types is None or "Flag" in types):
        flag = resources.get("Flag") or {}
        # Flags are written with PUT at an id of ours (write.flags.flag_id), which creates them the first time.
        if "update" not in _names(flag.get("interaction")):
            missing.append("update of Flag (PUT Flag/[id])")
        # Each write names the version it was decided from (If-Match): a server that ignored it would let a stale
        # run overwrite a newer Flag.
        if flag.get("versioning") != "versioned-update":
            missing.append("versioned update of Flag (If-Match; CapabilityStatement versioning versioned-update)")
        if "transaction" not in _names(rest.get("interaction")):
            missing.append("transaction Bundles (the Flags are written in transactions)")
    if need_export:
        level = "system" if need_export is True else str(need_export)
        if level not in EXPORT_LEVELS:
            raise ValueError(f"unknown $export level {level!r} (system, patient or group)")
        holder = rest if EXPORT_LEVELS[level] is None else resources.get(EXPORT_LEVELS[level]) or {}
        if "export" not in _names(holder.get("operation")):
            missing.append(
                f"Bulk Data $export at {level} level"
                + ("" if level == "system" else f" ({EXPORT_LEVELS[level]}/…/$export)")
            )
    return missing


def check_capabilities(
    client: FhirClient,
    *,
    need_export: bool | str = False,
    resource_types: Iterable[str] | None = None,
    write_flags: bool = True,
    history_types: Iterable[str] = (),
) -> dict:
    """Read the server's CapabilityStatement once and raise CapabilityError naming everything a run needs and
    the server does not declare: FHIR 4.0.x; the searches of REQUIRED_SEARCH for `resource_types` (all of them
    when None, none for []); update of Flag and transactions when `write_flags` and Flag is among the
    types; the type-level history of `history_types`; `$export` at `need_export` level (True = system, "patient",
    "group"). Returns the statement."""
    statement = client.capabilities()
    missing = missing_capabilities(
        statement,
        need_export=need_export,
        resource_types=resource_types,
        write_flags=write_flags,
        history_types=history_types,
    )
    where = redact_url(client.base_url)
    if missing:
        raise CapabilityError(
            f"the FHIR server {where} lacks what leukofhir needs: " + "; ".join(missing), missing=missing, url=where
        )
    log.info("FHIR server %s (FHIR %s) declares everything needed", where, statement.get("fhirVersion"))
    return statement
