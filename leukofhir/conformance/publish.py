"""`leukofhir conformance`: put the conformance resources on a FHIR server, writing only what differs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from leukofhir.config import Rules
from leukofhir.conformance.resources import conformance_resources
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import VersionConflictError

__all__ = ["Published", "publish", "conformance_command"]

log = logging.getLogger(__name__)

# How many times a resource whose version moved between our read and our write is read and decided again.
ROUNDS = 3


@dataclass(frozen=True)
class Published:
    """What became of one resource: `created`, `updated` or `unchanged`, and its version on the server."""

    resource_type: str
    id: str
    url: str
    action: str
    version: str | None


def _content(resource: dict) -> dict:
    """A resource without what the server adds (meta: versionId, lastUpdated, source); two equal ones need no write."""
    return {k: v for k, v in resource.items() if k != "meta"}


def _same_url(client: FhirClient, resource: dict) -> dict | None:
    """The resource of this type with this canonical URL on the server, if any: HAPI keeps one per URL and version
    (HAPI-0902), so one loaded by hand at another id is the one to update."""
    found = [
        r
        for r in client.search(resource["resourceType"], {"url": resource["url"]})
        if r.get("resourceType") == resource["resourceType"]
    ]
    return next((r for r in found if r.get("id") == resource["id"]), found[0] if found else None)


def _publish_one(client: FhirClient, resource: dict) -> Published:
    kind = resource["resourceType"]
    for _ in range(ROUNDS):
        current = _same_url(client, resource)
        rid = current["id"] if current is not None else resource["id"]
        resource = {**resource, "id": rid}
        if current is not None and _content(current) == _content(resource):
            return Published(kind, rid, resource["url"], "unchanged", (current.get("meta") or {}).get("versionId"))
        headers = {}
        if current is not None:
            # Decided from what was read: written over that version only (FHIR R4 http.html#concurrency).
            headers["If-Match"] = f'W/"{(current.get("meta") or {}).get("versionId")}"'
        try:
            written = client.request_json("PUT", f"{kind}/{rid}", json=resource, headers=headers, allow_empty=True)
        except VersionConflictError:
            log.info("%s/%s changed while it was written: read again", kind, rid)
            continue
        action = "created" if current is None else "updated"
        return Published(kind, rid, resource["url"], action, (written.get("meta") or {}).get("versionId"))
    raise VersionConflictError(
        f"{kind}/{resource['id']} kept changing on the server while it was written ({ROUNDS} tries)",
        status=409,
        outcome=None,
    )


def publish(client: FhirClient, rules: Rules) -> list[Published]:
    """PUT the conformance resources of `rules`' canonical base at their ids; one identical on the server is left
    alone, so a second run writes nothing."""
    return [_publish_one(client, resource) for resource in conformance_resources(rules)]


def conformance_command(args) -> int:
    from leukofhir.config import load_config
    from leukofhir.fhir.client import connect

    rules = load_config(args.config)
    with connect(args.fhir_url, args.auth, timeout=args.timeout) as client:
        results = publish(client, rules)
    for r in results:
        print(f"{r.resource_type + '/' + r.id:<60} {r.action:<9} version {r.version}  {r.url}")
    return 0
