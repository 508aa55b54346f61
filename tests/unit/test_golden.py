"""Golden tests on the external sample data (tests/data/external, see its README): expectations derived by hand."""

from __future__ import annotations

import json

from conftest import EXTERNAL

from leukofhir.evaluate.pipeline import evaluate_files

HL7 = EXTERNAL / "hl7-fhir-r4-examples"
SYNTHEA = EXTERNAL / "smart-generated-sample-data-R4-synthea"
CLINOSIM = EXTERNAL / "clinosim-0.6.5-generated"


def _run(tmp_path, *paths):
    report = evaluate_files([str(p) for p in paths], tmp_path, progress=False)
    flags = [json.loads(line) for line in (tmp_path / "Flag.ndjson").read_text().splitlines()]
    assert report["reconciled"]
    assert report["read_total"] == report["evaluated"] + sum(report["skipped"].values()) + sum(
        report["quarantined"].values()
    )
    return report, flags


def _summary(flag):
    grade = next(e["valueInteger"] for e in flag["extension"] if e["url"].endswith("/ctcae-grade"))
    drug = any(c["coding"][0]["code"] == "drug" for c in flag["category"])
    return (
        flag["subject"]["reference"],
        flag["code"]["coding"][0]["code"],
        flag["status"],
        flag["period"]["start"],
        flag["period"].get("end"),
        grade,
        drug,
    )


def test_hl7_general_health_panel(tmp_path):
    """Bundle-ghp: Patient/pat2 is not in the input, so age/sex unknown -> adult defaults (§1.3).
    The result Observations r1..r17 carry no time: each is a member (hasMember) of panel Observation p2, listed in
    DiagnosticReport ghp, effective 2015-08-16T06:40:17Z (§1.1 time fallback).
    - r7 WBC 4.6, lab LLN 4.0 -> not leukopenia.
    - r9 ANC 0.9 reported (so no derived ANC from r8 20 % x 4.6) -> 0.5 <= 0.9 < 1.0: Neutropenia, moderate, G3 (PM).
    - r11 lymphocytes 0.9, lab LLN 1.1 -> 0.8 <= 0.9 < 1.1: lymphopenia G1 (PN).
    - Hb 176 g/L = 17.6 g/dL, platelets 444: no pancytopenia. u7 (30405-5, urine leukocytes) never counts.
    The MedicationStatement/Request/Administration examples name no drug of §1.4 (example005 is entered-in-error)."""
    report, flags = _run(tmp_path, HL7)
    start = "2015-08-16T06:40:17Z"
    assert sorted(_summary(f) for f in flags) == sorted(
        [
            ("Patient/pat2", "165517008", "active", start, None, 3, False),
            ("Patient/pat2", "1156294003", "active", start, None, 1, False),
        ]
    )
    neutropenia = next(f for f in flags if f["code"]["coding"][0]["code"] == "165517008")
    assert neutropenia["code"]["text"] == "Neutropenia, moderate — ANC 0.9 ×10^9/L on 2015-08-16, CTCAE v5.0 grade 3"
    assert report["quarantined"] == {}
    assert report["skipped"]["status entered-in-error excluded"] == 1


def test_synthea_patient_bundles(tmp_path):
    """Five Synthea patient Bundles (adult men except Suzi; WBC LLN 4.0; urn:uuid references via fullUrl).
    WBC series by hand (×10^9/L):
    - Clemente: 4.74, 8.81 -> no Flag.
    - Granville (FOLFOX 2004): 2.26 (05-07) 1.07 0.54 1.24 3.68 1.81 (10-13), then 9.01 on 2005-01-23 -> one episode
      2004-05-07 .. 2005-01-23, inactive, worst 0.54 = G4, chemotherapy ordered within 90 days -> drug category.
    - Micah: 3.75 (2012-04-30) then 6.37 (2017-05-29): episode closed by that recovery, G1. Then 4.03 normal and
      0.745 (2018-01-26) 1.85 0.54 2.88 3.9 (2018-05-31) with no normal since: G4, chemotherapy -> drug. Evaluated as
      of the input's latest time (Suzi's count of 2020-12-22), Micah has had no WBC for 936 days: the episode has
      lapsed (v1.3 §4) -> inactive, period.end = the last low value, 2018-05-31.
    - Sherman (cisplatin/etoposide): 2.18 (2003-01-07), 2.59 (2003-04-07, 90 days later: same episode); next value
      3.9 on 2004-01-13 is low after 281 days (> 90-day episode gap) -> first episode inactive, ends 2003-04-07, G2,
      drug; second episode 2004-01-13 .. 2009-09-22 (6.27), G1, no drug in the 90 days before it.
    - Suzi (female, no chemotherapy): 3.8 (2014-12-16), 3.82 (2020-12-22): two G1 episodes, the first closed by the
      gap, the second active; never drug-associated."""
    _, flags = _run(tmp_path, SYNTHEA / "bundles")
    got = sorted(_summary(f) for f in flags)
    micah, granville = "Patient/720b9118-3153-40c8-b162-cd963506be0e", "Patient/c2128e3c-1970-4f69-94c2-ac4f5de8b53b"
    sherman, suzi = "Patient/ffb8ae8f-8c7f-4475-8c42-d38419108e94", "Patient/95efed54-0648-4faf-a179-9a2b3c45e92d"
    leuko = "84828003"
    assert got == sorted(
        [
            (micah, leuko, "inactive", "2012-04-30T07:21:10Z", "2017-05-29T07:21:10Z", 1, False),
            (micah, leuko, "inactive", "2018-01-26T07:21:10Z", "2018-05-31T07:21:10Z", 4, True),
            (suzi, leuko, "inactive", "2014-12-16T00:24:54Z", "2014-12-16T00:24:54Z", 1, False),
            (suzi, leuko, "active", "2020-12-22T00:24:54Z", None, 1, False),
            (granville, leuko, "inactive", "2004-05-07T04:59:42Z", "2005-01-23T04:59:42Z", 4, True),
            (sherman, leuko, "inactive", "2003-01-07T06:01:37Z", "2003-04-07T06:01:37Z", 2, True),
            (sherman, leuko, "inactive", "2004-01-13T06:01:37Z", "2009-09-22T06:01:37Z", 1, False),
        ]
    )
    (lapsed,) = [f for f in flags if f["period"]["start"] == "2018-01-26T07:21:10Z"]
    assert lapsed["code"]["text"].endswith("; no follow-up count for more than 90 days")


def test_synthea_ndjson_needs_patients_for_urn_uuid_subjects(tmp_path):
    """Observation.cbc.ndjson.gz alone: subjects are urn:uuid (no type) and no Patient is in the input, so no
    Observation in scope (WBC 6690-2 x1233 and 26464-8 x1 + hemoglobin x1240 + platelets x1233 = 3707; the red-cell
    indices are out of scope) can be tied to a Patient -> quarantined; with Patient.ndjson.gz they resolve."""
    report, flags = _run(tmp_path / "a", SYNTHEA / "Observation.cbc.ndjson.gz")
    assert flags == [] and report["quarantined"] == {"subject does not resolve to a Patient in the input": 3707}
    report, flags = _run(
        tmp_path / "b",
        SYNTHEA / "Observation.cbc.ndjson.gz",
        SYNTHEA / "Patient.ndjson.gz",
        SYNTHEA / "MedicationRequest.ndjson.gz",
    )
    assert report["quarantined"] == {} and flags
    assert report["read"] == {"MedicationRequest": 4712, "Observation": 13526, "Patient": 615}
    drug_flags = [f for f in flags if any(c["coding"][0]["code"] == "drug" for c in f["category"])]
    assert drug_flags and all("antineoplastic chemotherapy" in f["code"]["text"] for f in drug_flags)


def test_clinosim_per_microlitre_units(tmp_path):
    """clinosim WBC in /uL (e.g. 7849 -> 7.849 ×10^9/L) with reference range 3500-10500 /uL (-> 3.5-10.5): none of
    the 124 WBC results is below 3.5, so no Flag; nothing is quarantined (value and range agree in magnitude)."""
    report, flags = _run(tmp_path, CLINOSIM)
    assert flags == [] and report["quarantined"] == {}
    assert report["read"] == {"Observation": 232, "Patient": 69}
