"""The draft orders of an order-sign request: which drug of the rules' list each MedicationRequest names, matched as
the rules match exposures (RxNorm ingredient, ATC prefix, ingredient name; clinical-rules §1.4)."""

from __future__ import annotations

from dataclasses import dataclass

from leukofhir.config import Rules
from leukofhir.normalise.context import Context
from leukofhir.normalise.exposures import Exposures
from leukofhir.normalise.patients import Patients


@dataclass(frozen=True)
class DraftOrder:
    reference: str | None  # "MedicationRequest/<id>" when it has an id
    drug_key: str  # the key of rules.yaml medications.drugs
    agent: str | None  # the ingredient as the order names it


def _resources(draft_orders) -> list[dict]:
    if not isinstance(draft_orders, dict):
        return []
    if draft_orders.get("resourceType") != "Bundle":
        return [draft_orders]
    return [
        e["resource"]
        for e in draft_orders.get("entry") or []
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]


class OrderMatcher:
    """Built once per service: the rules' drug matcher."""

    def __init__(self, rules: Rules, base_url: str | None):
        context = Context(rules, base_url)
        self.exposures = Exposures(context, Patients(context))

    def listed_drugs(self, draft_orders) -> list[DraftOrder]:
        """Each draft MedicationRequest whose drug is in the rules' list (others, and other resources, are not)."""
        resources = _resources(draft_orders)
        medications = {f"Medication/{r.get('id')}": r for r in resources if r.get("resourceType") == "Medication"}
        found = []
        for order in resources:
            if order.get("resourceType") != "MedicationRequest" or order.get("status") not in (None, "draft"):
                continue
            match = self.exposures.drug_of_concept(order.get("medicationCodeableConcept"))
            if match is None:
                match = self._referenced(order, medications)
            if match is not None:
                rid = order.get("id")
                found.append(DraftOrder(f"MedicationRequest/{rid}" if isinstance(rid, str) else None, *match))
        return found

    def _referenced(self, order: dict, medications: dict[str, dict]):
        reference = order.get("medicationReference")
        target = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(target, str):
            return None
        if target.startswith("#"):
            medication = next(
                (c for c in order.get("contained") or [] if isinstance(c, dict) and c.get("id") == target[1:]), None
            )
        else:
            medication = medications.get(target)
        return self.exposures.drug_of_medication(medication) if isinstance(medication, dict) else None
