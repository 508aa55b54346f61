"""Build the FHIR R4 Flag of a FlagSpec exactly as clinical-rules §5 says, validated with fhir.resources (R4B)."""

from __future__ import annotations

from fhir.resources.R4B.flag import Flag

from leukofhir.config import Rules
from leukofhir.evaluate.narrative import flag_narrative
from leukofhir.evaluate.rules import FlagSpec, iso_instant
from leukofhir.fhir.references import DETAIL_URL

__all__ = ["build_flag", "flag_row", "flag_text"]

SNOMED = "http://snomed.info/sct"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/flag-category"
PRIORITY_URL = "http://hl7.org/fhir/StructureDefinition/flag-priority"
PRIORITY_SYSTEM = "http://hl7.org/fhir/flag-priority-code"
_PRIORITY_DISPLAY = {"PH": "High priority", "PM": "Medium priority", "PL": "Low priority", "PN": "No alarm"}


def build_flag(spec: FlagSpec, rules: Rules, checked_shapes: set | None = None) -> dict:
    """The Flag JSON of one episode; raises pydantic.ValidationError if it is not a valid R4 Flag.

    fhir.resources costs about 1 ms per Flag. With `checked_shapes`, a Flag is validated only when its shape
    (status, code, priority, categories, period end) is new: everything else in it is a string FHIR does not
    constrain (references, text, the hex identifier) or a value we format (instants, grade 1-4), so it cannot
    change the outcome."""
    uris = rules.uris
    priority = rules.priority[spec.grade]
    category = [{"coding": [{"system": CATEGORY_SYSTEM, "code": "clinical", "display": "Clinical"}]}]
    if spec.drugs:
        category.append({"coding": [{"system": CATEGORY_SYSTEM, "code": "drug", "display": "Drug"}]})
    extension = [
        {
            "url": PRIORITY_URL,
            "valueCodeableConcept": {
                "coding": [{"system": PRIORITY_SYSTEM, "code": priority, "display": _PRIORITY_DISPLAY[priority]}]
            },
        }
    ]
    # flag-detail: one per piece of evidence (§5): low Observations, the recovering one, the medications.
    extension += [{"url": DETAIL_URL, "valueReference": {"reference": ref}} for ref in spec.evidence]
    extension += [
        {"url": DETAIL_URL, "valueReference": {"reference": ref, "display": label}} for label, ref in spec.drugs
    ]
    extension.append({"url": uris.ctcae_grade_extension, "valueInteger": spec.grade})
    period = {"start": iso_instant(spec.start)}
    if spec.end is not None:
        period["end"] = iso_instant(spec.end)
    flag = {
        "resourceType": "Flag",
        "meta": {"profile": [uris.flag_profile], "tag": [{"system": uris.tag_system, "code": uris.tag_code}]},
        "extension": extension,
        "identifier": [{"system": uris.identifier_system, "value": spec.identifier}],
        "status": spec.status,
        "category": category,
        "code": {"coding": [{"system": SNOMED, "code": spec.code, "display": spec.display}], "text": spec.text},
        "subject": {"reference": spec.patient_id},
        "period": period,
        "author": {"reference": uris.author},
    }
    flag["text"] = flag_text(flag, rules)
    shape = (spec.status, spec.code, spec.grade, bool(spec.drugs), spec.end is not None, bool(spec.evidence))
    if checked_shapes is None or shape not in checked_shapes:
        Flag.model_validate(flag)  # the R4(B) model checks what we write (DESIGN: write step)
        if checked_shapes is not None:
            checked_shapes.add(shape)
    return flag


def flag_text(flag: dict, rules: Rules) -> dict:
    """The generated narrative of a Flag of the project, from its own elements (narrative.py)."""
    return flag_narrative(flag, rules.uris.ctcae_grade_extension, PRIORITY_URL, DETAIL_URL)


def flag_row(spec: FlagSpec, row_id: str) -> dict:
    """The row the GX `flags` suite checks (validate.py): identifier, status, code, subject."""
    return {
        "row_id": row_id,
        "identifier": spec.identifier,
        "status": spec.status,
        "code": spec.code,
        "subject": spec.patient_id,
    }
