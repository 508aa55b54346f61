"""`leukofhir subscribe`: create, update or remove the project's R4 rest-hook Subscriptions, idempotently."""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from leukofhir.config import Rules
from leukofhir.errors import LeukofhirError, UsageError
from leukofhir.fhir.client import FHIR_JSON, FhirClient
from leukofhir.realtime.secret import authorization_header

log = logging.getLogger(__name__)

# HAPI sends no notification for a deletion unless the Subscription asks for it with this channel extension
# (HapiExtensions.EX_SEND_DELETE_MESSAGES; "default is ignoring them"). Other servers ignore it.
SEND_DELETES_EXTENSION = "http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages"
# HAPI writes the matching strategy it chose for the criteria into meta.tag (IN_MEMORY or DATABASE).
MATCHING_STRATEGY_SYSTEM = "http://hapifhir.io/fhir/StructureDefinition/subscription-matching-strategy"
# Our own cap. HAPI 8.8 stored and matched in memory a 10,016-character criteria (tried on the local server);
# other servers treat criteria like a search URL, and 2,000 characters is a length every server and proxy takes.
MAX_CRITERIA_LENGTH = 2000
# Statuses under which a Subscription of ours is working (R4: requested until the server activates it).
_LIVE = {"requested", "active"}


class SubscriptionError(LeukofhirError):
    """A Subscription the server put in `error` status, or a criteria the server cannot take."""


@dataclass(frozen=True)
class SubscriptionSpec:
    """One kind of Subscription of the project: the resource type it watches and its criteria."""

    resource_type: str
    criteria: str
    reason: str


@dataclass
class SubscriptionResult:
    """What `subscribe` did to one Subscription: action created | updated | unchanged | removed."""

    resource_type: str
    id: str
    action: str
    status: str = ""
    matching: str = ""


def subscription_specs(rules: Rules) -> list[SubscriptionSpec]:
    """The project's Subscriptions, from the rules file (codes are never copied here).

    - Observations: every LOINC code of clinical-rules §1.1 as one OR-list of `system|code` tokens, the form
      HAPI matches in memory. No status filter: an amendment, a correction or `entered-in-error` must reach
      the patient's evaluation as much as a new final result (§4 Convergence).
    - Medication resources the rules read (§1.4): MedicationStatement always, MedicationRequest and
      MedicationAdministration when the site enables them. All of them (`Type?`): a drug is also recognised
      by name in free text or in a referenced Medication, which no token criteria can express, and a status
      change (`entered-in-error`, `not-taken`) matters too."""
    system = rules.observations.code_system
    tokens = ",".join(f"{system}|{code}" for code in rules.code_to_concept)
    specs = [
        SubscriptionSpec(
            "Observation",
            f"Observation?code={tokens}",
            "leukofhir: re-evaluate a patient's leukopenia Flags when one of their blood counts changes",
        )
    ]
    meds = rules.medications
    for resource_type, enabled in (
        ("MedicationStatement", True),
        ("MedicationRequest", meds.include_requests),
        ("MedicationAdministration", meds.include_administrations),
    ):
        if enabled:
            specs.append(
                SubscriptionSpec(
                    resource_type,
                    f"{resource_type}?",
                    f"leukofhir: re-evaluate a patient's leukopenia Flags when their {resource_type} changes",
                )
            )
    for spec in specs:
        if len(spec.criteria) > MAX_CRITERIA_LENGTH:
            raise SubscriptionError(
                f"Subscription criteria for {spec.resource_type} is {len(spec.criteria)} characters, more than "
                f"{MAX_CRITERIA_LENGTH}: too many codes in the rules file for one criteria"
            )
    return specs


def check_endpoint(endpoint: str) -> str:
    """The endpoint, checked: an absolute http(s) URL. Plain http is only sensible on loopback."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--endpoint must be an absolute http(s) URL, not {endpoint!r}")
    if parts.query or parts.fragment:
        raise UsageError("--endpoint must not have a query or fragment: the server appends /Type/id to it")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        log.warning(
            "endpoint %s is plain http on a non-loopback host: the shared secret and the resources "
            "travel unencrypted; use https",
            endpoint,
        )
    return endpoint.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_subscription(spec: SubscriptionSpec, endpoint: str, secret: str, rules: Rules) -> dict:
    """The Subscription resource for `spec`, tagged as the project's, status `requested` (R4: the server
    activates it). `payload` makes the server PUT the whole resource, so the receiver learns the patient
    without reading it back; the secret travels as a header the receiver checks."""
    return {
        "resourceType": "Subscription",
        "meta": {"tag": [{"system": rules.uris.tag_system, "code": rules.uris.tag_code}]},
        "status": "requested",
        "reason": spec.reason,
        "criteria": spec.criteria,
        "channel": {
            "extension": [{"url": SEND_DELETES_EXTENSION, "valueBoolean": True}],
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": FHIR_JSON,
            "header": [authorization_header(secret)],
        },
    }


def _same(existing: dict, wanted: dict) -> bool:
    """Whether an existing Subscription already is what we would write (so nothing is written)."""
    if existing.get("status") not in _LIVE:
        return False
    if any(existing.get(k) != wanted[k] for k in ("criteria", "reason")):
        return False
    have, want = existing.get("channel") or {}, wanted["channel"]
    if any(have.get(k) != want[k] for k in ("type", "endpoint", "payload", "header")):
        return False
    sends_deletes = [
        e.get("valueBoolean") for e in have.get("extension") or [] if e.get("url") == SEND_DELETES_EXTENSION
    ]
    return sends_deletes == [True]


def _ours(client: FhirClient, rules: Rules) -> list[dict]:
    tag = ",".join(rules.uris.tags)  # also those written under a previous canonical base
    found = list(client.search("Subscription", {"_tag": tag}))
    return sorted((s for s in found if s.get("resourceType") == "Subscription"), key=lambda s: s.get("id", ""))


def _kind(subscription: dict) -> str:
    return str(subscription.get("criteria") or "").split("?", 1)[0]


def _matching(subscription: dict) -> str:
    for tag in (subscription.get("meta") or {}).get("tag") or []:
        if tag.get("system") == MATCHING_STRATEGY_SYSTEM:
            return str(tag.get("code") or "")
    return ""


def subscribe(
    client: FhirClient,
    endpoint: str,
    secret: str,
    rules: Rules,
    *,
    wait: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[SubscriptionResult]:
    """Make the server hold exactly one Subscription of the project per spec, pointing at `endpoint`.

    Ours are found by the project's tag (R4 Subscription has no identifier). An existing one that already
    says the same is left alone (no new version); one that differs is updated in place (and its status reset
    to `requested`); a missing one is created; extra ones of a kind (e.g. from two runs at once) and kinds the
    rules no longer ask for are deleted. Then waits up to `wait` seconds for the server to activate them."""
    endpoint = check_endpoint(endpoint)
    wanted = {
        spec.resource_type: build_subscription(spec, endpoint, secret, rules) for spec in subscription_specs(rules)
    }
    existing: dict[str, list[dict]] = {}
    for sub in _ours(client, rules):
        existing.setdefault(_kind(sub), []).append(sub)

    results: list[SubscriptionResult] = []
    for kind, subs in existing.items():
        extra = subs if kind not in wanted else subs[1:]
        for sub in extra:
            client.request("DELETE", f"Subscription/{sub['id']}")
            results.append(SubscriptionResult(kind, sub["id"], "removed"))
    for kind, resource in wanted.items():
        current = (existing.get(kind) or [None])[0]
        if current is not None and _same(current, resource):
            results.append(SubscriptionResult(kind, current["id"], "unchanged", current.get("status", "")))
            continue
        if current is None:
            written = client.request("POST", "Subscription", json=resource).json()
            action = "created"
        else:
            written = client.update(dict(resource, id=current["id"]))
            action = "updated"
        results.append(SubscriptionResult(kind, written["id"], action, written.get("status", "")))

    _await_active(client, [r for r in results if r.action != "removed"], wait, sleep)
    return results


def _await_active(client: FhirClient, results: list[SubscriptionResult], wait: float, sleep) -> None:
    """Poll until each Subscription is active; `error` is raised with the server's Subscription.error text."""
    deadline = time.monotonic() + wait
    pending = list(results)
    while True:
        still = []
        for result in pending:
            current = client.read("Subscription", result.id) or {}
            result.status, result.matching = current.get("status", "missing"), _matching(current)
            if result.status == "error":
                raise SubscriptionError(
                    f"Subscription/{result.id} ({result.resource_type}) is in error: "
                    f"{current.get('error', 'no reason given')}"
                )
            if result.status != "active":
                still.append(result)
        pending = still
        if not pending or time.monotonic() >= deadline:
            break
        sleep(0.5)
    for result in pending:
        log.warning(
            "Subscription/%s (%s) is still %s after %.0f s", result.id, result.resource_type, result.status, wait
        )
    for result in results:
        if result.matching and result.matching != "IN_MEMORY":
            log.warning(
                "Subscription/%s: the server matches it by %s (a query per change), not in memory",
                result.id,
                result.matching,
            )


def unsubscribe(client: FhirClient, rules: Rules) -> list[SubscriptionResult]:
    """Delete every Subscription carrying the project's tag."""
    results = []
    for sub in _ours(client, rules):
        client.request("DELETE", f"Subscription/{sub['id']}")
        results.append(SubscriptionResult(_kind(sub), sub["id"], "removed"))
    return results


def subscribe_command(args) -> int:
    from leukofhir.config import load_config
    from leukofhir.fhir.auth import make_auth
    from leukofhir.realtime.secret import hook_secret

    rules = load_config(args.config)
    with FhirClient(args.fhir_url, make_auth(args.auth), timeout=args.timeout) as client:
        if args.remove:
            results = unsubscribe(client, rules)
            if not results:
                print("no Subscription of leukofhir on the server")
        else:
            if not args.endpoint:
                raise UsageError("--endpoint is required (the receiver's URL, e.g. http://127.0.0.1:8089/notify)")
            results = subscribe(client, args.endpoint, hook_secret(), rules, wait=args.wait)
    for r in results:
        extra = f" {r.status}" + (f" ({r.matching.lower().replace('_', '-')} matching)" if r.matching else "")
        print(f"Subscription/{r.id:<40} {r.resource_type:<26} {r.action}{extra if r.action != 'removed' else ''}")
    return 0
