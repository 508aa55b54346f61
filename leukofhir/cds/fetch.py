"""A patient's data for a CDS Hooks request: the EHR's prefetch when it is complete, otherwise read from the configured
FHIR server with the searches a run makes (extract.search.history_searches), never from another server."""

from __future__ import annotations

from urllib.parse import urlencode

from leukofhir.config import Rules
from leukofhir.errors import UsageError
from leukofhir.extract.search import history_searches, iter_history
from leukofhir.fhir.auth import BearerAuth
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.secrets import check_token

PATIENT_TEMPLATE = "{{context.patientId}}"
FETCH_TIMEOUT = 10.0  # the EHR waits for the answer: short, one retry


class BadHookRequest(ValueError):
    """A hook request the service cannot answer as sent (answered 400 with this message)."""


def prefetch_templates(rules: Rules) -> dict[str, str]:
    """The discovery document's prefetch: the same searches a run makes for one patient, as FHIR query templates."""
    templates = {}
    for resource_type, params in history_searches(rules, [PATIENT_TEMPLATE]):
        if resource_type == "Patient":
            templates["patient"] = f"Patient/{PATIENT_TEMPLATE}"
            continue
        key = "flags" if resource_type == "Flag" else resource_type[0].lower() + resource_type[1:] + "s"
        query = urlencode(params, doseq=True, safe="{}|,/:")
        templates[key] = f"{resource_type}?{query}"
    return templates


def prefetched_resources(prefetch, templates: dict[str, str]) -> list[dict] | None:
    """Every resource of the prefetch when it answers every template completely; None when any is missing, null or
    only a first page (a Bundle with a `next` link): the service then reads the patient itself."""
    if not isinstance(prefetch, dict):
        return None
    resources: list[dict] = []
    for key in templates:
        value = prefetch.get(key)
        if not isinstance(value, dict):
            return None
        if value.get("resourceType") == "Bundle":
            if any(isinstance(link, dict) and link.get("relation") == "next" for link in value.get("link") or []):
                return None
            for entry in value.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(resource, dict) and (entry.get("search") or {}).get("mode") != "outcome":
                    resources.append(resource)
        elif key == "patient" and value.get("resourceType") == "Patient":
            resources.append(value)
        else:
            return None
    return resources


def same_server(fhir_server: str, configured: str) -> bool:
    return fhir_server.rstrip("/") == configured.rstrip("/")


class PatientReader:
    """Reads one patient's history from the configured server: with the EHR's bearer token (`fhirAuthorization`)
    when the request carries one, else with the service's own connection (`--auth`)."""

    def __init__(self, client: FhirClient, rules: Rules):
        self.client, self.rules = client, rules

    @property
    def base_url(self) -> str:
        return self.client.base_url

    def read(self, patient_id: str, fhir_server, fhir_authorization) -> list[dict]:
        if fhir_server is not None and (
            not isinstance(fhir_server, str) or not same_server(fhir_server, self.client.base_url)
        ):
            # The service must not be made to call arbitrary URLs (or send a token there).
            raise BadHookRequest("fhirServer is not the FHIR server this service reads; it reads no other")
        if fhir_server is not None and isinstance(fhir_authorization, dict):
            if str(fhir_authorization.get("token_type", "")).lower() != "bearer":
                raise BadHookRequest("fhirAuthorization.token_type must be Bearer")
            try:
                token = check_token(str(fhir_authorization.get("access_token") or ""), "fhirAuthorization.access_token")
            except UsageError as exc:
                raise BadHookRequest(str(exc)) from None
            with FhirClient(
                self.client.base_url, BearerAuth(lambda: token), timeout=FETCH_TIMEOUT, max_retries=1
            ) as client:
                return list(iter_history(client, [patient_id], self.rules))
        return list(iter_history(self.client, [patient_id], self.rules))
