"""The Flag JSON of clinical-rules §5, validated with fhir.resources R4B."""

from __future__ import annotations

from fhir.resources.R4B.flag import Flag

from leukofhir.config import load_config
from leukofhir.evaluate.flag_resource import build_flag
from support.fhir_builders import at, flags_for, observation, patient, statement

RULES = load_config()


def _flag(resources):
    (spec,) = flags_for(resources)
    return build_flag(spec, RULES)


def test_flag_has_every_element_of_section_5():
    flag = _flag([patient(), observation("a", "anc", 0.9), statement("m", "clozapine", point=at(days=-3))])
    Flag.model_validate(flag)
    assert flag["status"] == "active"
    assert flag["identifier"][0]["system"] == "https://leukofhir.example/fhir/flag-episode"
    assert flag["code"]["coding"] == [
        {"system": "http://snomed.info/sct", "code": "165517008", "display": "Neutropenia"}
    ]
    assert flag["code"]["text"].startswith("Neutropenia, moderate — ANC 0.9 ×10^9/L on 2024-03-01, CTCAE v5.0 grade 3")
    assert flag["subject"] == {"reference": "Patient/p1"}
    assert flag["period"] == {"start": "2024-03-01T08:00:00Z"}
    assert flag["author"] == {"reference": "Device/leukofhir-rules-engine"}
    codes = [c["coding"][0]["code"] for c in flag["category"]]
    assert codes == ["clinical", "drug"]
    category = "http://terminology.hl7.org/CodeSystem/flag-category"
    assert all(c["coding"][0]["system"] == category for c in flag["category"])
    by_url = {}
    for ext in flag["extension"]:
        by_url.setdefault(ext["url"], []).append(ext)
    priority = by_url["http://hl7.org/fhir/StructureDefinition/flag-priority"][0]["valueCodeableConcept"]["coding"][0]
    assert priority["system"] == "http://hl7.org/fhir/flag-priority-code" and priority["code"] == "PM"
    details = [e["valueReference"]["reference"] for e in by_url["http://hl7.org/fhir/StructureDefinition/flag-detail"]]
    assert details == ["Observation/a", "MedicationStatement/m"]
    assert by_url["https://leukofhir.example/fhir/StructureDefinition/ctcae-grade"] == [
        {"url": "https://leukofhir.example/fhir/StructureDefinition/ctcae-grade", "valueInteger": 3}
    ]
    assert flag["meta"]["tag"] == [{"system": "https://leukofhir.example/fhir/tag", "code": "leukofhir"}]
    assert flag["meta"]["profile"] == ["https://leukofhir.example/fhir/StructureDefinition/leukofhir-flag"]
    assert flag["text"]["status"] == "generated"
    assert flag["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">')


def test_priority_mapping_per_grade():
    for value, code in ((3.5, "PN"), (2.5, "PL"), (1.5, "PM"), (0.5, "PH")):
        flag = _flag([patient(), observation("w", "wbc", value)])
        ext = next(e for e in flag["extension"] if e["url"].endswith("flag-priority"))
        assert ext["valueCodeableConcept"]["coding"][0]["code"] == code


def test_inactive_flag_has_period_end_and_no_drug_category():
    flag = _flag([patient(), observation("w1", "wbc", 3.0), observation("w2", "wbc", 4.5, time=at(days=5))])
    assert flag["status"] == "inactive" and flag["period"]["end"] == "2024-03-06T08:00:00Z"
    assert [c["coding"][0]["code"] for c in flag["category"]] == ["clinical"]
    Flag.model_validate(flag)
