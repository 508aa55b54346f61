"""Table-driven tests of every rule of clinical-rules.md §2-§4 (thresholds strict `<`, grades CTCAE v5.0)."""

from __future__ import annotations

import random

import pytest

from leukofhir.config import load_config
from support.fhir_builders import at, flags_for, observation, patient, report, statement

RULES = load_config()
ADULT = patient("p1", "1970-05-05", "female")


def one(resources, family=None):
    specs = [s for s in flags_for(resources) if family is None or s.family == family]
    return specs


# -- §2 leukopenia: WBC < LLN, grades G1 < LLN–3.0, G2 < 3.0–2.0, G3 < 2.0–1.0, G4 < 1.0 -------------------------
@pytest.mark.parametrize(
    "value, grade",
    [(4.0, None), (3.99, 1), (3.0, 1), (2.99, 2), (2.0, 2), (1.99, 3), (1.0, 3), (0.99, 4), (0.0, 4)],
)
def test_leukopenia_grade_boundaries_adult(value, grade):
    specs = one([ADULT, observation("w", "wbc", value)], "leukocytes")
    if grade is None:
        assert specs == []
    else:
        (spec,) = specs
        assert (spec.code, spec.grade, spec.status) == ("84828003", grade, "active")
        assert f"CTCAE v5.0 grade {grade}" in spec.text


# §1.3 age bands of the WBC LLN (default when the lab gives no range); value just below / at the LLN.
@pytest.mark.parametrize(
    "birth, lln",
    [
        ("2024-02-27", 9.0),  # 3 days old: < 7 days
        ("2024-02-20", 5.0),  # 10 days: 7 days – < 1 month
        ("2023-01-01", 6.0),  # 14 months: 1 month – < 2 years
        ("2020-01-01", 5.0),  # 4 years: 2 – < 7 years
        ("2010-01-01", 4.5),  # 14 years: 7 – < 18 years
        ("1990-01-01", 4.0),  # adult
        (None, 4.0),  # unknown age: adult default
    ],
)
def test_wbc_lln_age_bands(birth, lln):
    pat = patient("p1", birth, "male")
    assert one([pat, observation("w", "wbc", lln)], "leukocytes") == []
    (spec,) = one([pat, observation("w", "wbc", round(lln - 0.01, 2))], "leukocytes")
    assert spec.grade == 1 and spec.condition == "leukopenia"  # every band's LLN is above 3.0: just below it is G1


def test_age_band_boundary_is_the_birthday():
    # Born 2022-03-01 08:00 is 2 years old from 2024-03-01 00:00 UTC: LLN 5.0, not 6.0.
    pat = patient("p1", "2022-03-01", "male")
    assert one([pat, observation("w", "wbc", 5.5)], "leukocytes") == []
    pat = patient("p1", "2022-03-02", "male")  # one day short of 2 years: LLN 6.0
    assert len(one([pat, observation("w", "wbc", 5.5)], "leukocytes")) == 1


def test_lab_reference_range_replaces_the_default_lln():
    assert len(one([ADULT, observation("w", "wbc", 4.2, low=4.5)], "leukocytes")) == 1
    assert one([ADULT, observation("w", "wbc", 3.8, low=3.5)], "leukocytes") == []


def test_reference_range_bound_without_a_unit_is_read_in_the_value_unit():
    # clinical-rules v1.1 §1.2: labs often send the bare number; ignoring it missed a 4.2 under a lab LLN of 4.5.
    obs = observation("w", "wbc", 4.2)
    obs["referenceRange"] = [{"low": {"value": 4.5}, "high": {"value": 11.0}}]
    (spec,) = one([ADULT, obs], "leukocytes")
    assert spec.grade == 1 and spec.condition == "leukopenia"


# clinical-rules §1.3, v1.1 "one notion of age": every age band changes at 00:00 UTC of the birthday (calendar age);
# one second before it the younger band applies. Born on 29 February: the birthday is 28 February in other years.
@pytest.mark.parametrize(
    "edge, birth, birthday, concept, value, low_before, low_from",
    [
        ("WBC 7 days: LLN 9.0 -> 5.0", "2024-03-01", "2024-03-08", "wbc", 6.0, True, False),
        ("WBC 1 month: 5.0 -> 6.0", "2024-01-31", "2024-02-29", "wbc", 5.5, False, True),
        ("WBC 1 month, born the 31st", "2023-12-31", "2024-01-31", "wbc", 5.5, False, True),
        ("WBC 2 years: 6.0 -> 5.0", "2022-03-15", "2024-03-15", "wbc", 5.5, True, False),
        ("WBC 7 years: 5.0 -> 4.5", "2017-03-15", "2024-03-15", "wbc", 4.8, True, False),
        ("WBC 18 years: 4.5 -> 4.0", "2006-03-15", "2024-03-15", "wbc", 4.2, True, False),
        ("WBC 18 years, born 29 February", "2004-02-29", "2022-02-28", "wbc", 4.2, True, False),
        ("WBC 2 years, born 29 February, leap birthday", "2020-02-29", "2022-02-28", "wbc", 5.5, True, False),
        ("ANC 14 days: lab range only -> 1.0", "2024-03-01", "2024-03-15", "anc", 0.8, False, True),
        ("ANC 1 year: 1.0 -> 1.5", "2023-03-15", "2024-03-15", "anc", 1.2, False, True),
        ("ANC 1 year, born 29 February", "2020-02-29", "2021-02-28", "anc", 1.2, False, True),
        ("lymphocytes 2 years: 3.0 -> 1.5", "2022-03-15", "2024-03-15", "lymphocytes_abs", 2.0, True, False),
        ("lymphocytes 18 years: 1.5 -> 1.0", "2006-03-15", "2024-03-15", "lymphocytes_abs", 1.2, True, False),
        ("hemoglobin 18 years: 11.0 -> 12.0 (female)", "2006-03-15", "2024-03-15", "hemoglobin", 11.5, False, True),
        ("hemoglobin 18 years, born 29 February", "2004-02-29", "2022-02-28", "hemoglobin", 11.5, False, True),
    ],
)
def test_age_band_edges_are_calendar_birthdays(edge, birth, birthday, concept, value, low_before, low_from):
    family = {
        "wbc": "leukocytes",
        "anc": "granulocytes",
        "lymphocytes_abs": "lymphocytes",
        "hemoglobin": "pancytopenia",
    }[concept]
    for time, low in ((f"{birthday}T00:00:00Z", low_from), (_second_before(birthday), low_before)):
        res = [patient("p1", birth, "female"), observation("x", concept, value, time=time)]
        if concept == "hemoglobin":  # pancytopenia: hemoglobin judged with a low WBC and low platelets
            res += [observation("w", "wbc", 2.5, time=time), observation("p", "platelets", 90, time=time)]
        assert bool(one(res, family)) is low, f"{edge} at {time}"


def _second_before(day: str) -> str:
    from datetime import date, timedelta

    return (date.fromisoformat(day) - timedelta(days=1)).isoformat() + "T23:59:59Z"


@pytest.mark.parametrize(
    "gender, applies, expect_flag",
    [("male", "male", True), ("female", "male", False)],
)
def test_reference_range_applies_to_sex(gender, applies, expect_flag):
    obs = observation("w", "wbc", 4.2)
    obs["referenceRange"] = [{"low": {"value": 4.5, "unit": "10*9/L"}, "appliesTo": [{"text": applies}]}]
    assert bool(one([patient("p1", "1980-01-01", gender), obs], "leukocytes")) is expect_flag


# §1.2 units: each accepted unit converts to 10^9/L.
@pytest.mark.parametrize(
    "unit, value",
    [
        ("10*9/L", 2.5),
        ("10^9/L", 2.5),
        ("x10*9/L", 2.5),
        ("G/L", 2.5),
        ("/nL", 2.5),
        ("10*3/uL", 2.5),
        ("10^3/uL", 2.5),
        ("x10E3/uL", 2.5),
        ("10*3/mm3", 2.5),
        ("10*6/mL", 2.5),
        ("K/uL", 2.5),
        ("K/ul", 2.5),
        ("k/uL", 2.5),
        ("Tsd/uL", 2.5),
        ("thou/uL", 2.5),
        ("/uL", 2500),
        ("/mm3", 2500),
        ("{cells}/uL", 2500),
        ("cells/uL", 2500),
        ("/µL", 2500),
        ("/mm^3", 2500),
    ],
)
def test_every_count_unit_converts(unit, value):
    (spec,) = one([ADULT, observation("w", "wbc", value, unit=unit)], "leukocytes")
    assert spec.grade == 2 and "WBC 2.5 ×10^9/L" in spec.text


# -- §2 neutropenia / agranulocytosis ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "anc, condition, grade, word",
    [
        (1.5, None, None, None),
        (1.49, "neutropenia", 2, "mild"),
        (1.0, "neutropenia", 2, "mild"),
        (0.99, "neutropenia", 3, "moderate"),
        (0.5, "neutropenia", 3, "moderate"),
        (0.49, "agranulocytosis", 4, None),
        (0.0, "agranulocytosis", 4, None),
    ],
)
def test_neutropenia_bands_adult(anc, condition, grade, word):
    specs = one([ADULT, observation("a", "anc", anc)], "granulocytes")
    if condition is None:
        assert specs == []
        return
    (spec,) = specs
    assert (spec.condition, spec.grade) == (condition, grade)
    assert spec.code == {"neutropenia": "165517008", "agranulocytosis": "17182001"}[condition]
    if word:
        assert spec.text.startswith(f"Neutropenia, {word} — ANC")


@pytest.mark.parametrize(
    "birth, anc, low",
    [
        ("2023-09-01", 1.2, False),  # 6 months: threshold 1.0
        ("2023-09-01", 0.99, True),
        ("2023-01-01", 1.49, True),  # 14 months: 1.5
        ("2024-02-25", 0.3, False),  # 5 days, no lab range: not judged
    ],
)
def test_neutropenia_age_thresholds(birth, anc, low):
    specs = one([patient("p1", birth, "male"), observation("a", "anc", anc)], "granulocytes")
    assert bool(specs) is low


def test_neonate_judged_only_against_the_lab_range():
    pat = patient("p1", "2024-02-25", "male")  # 5 days old at T0
    assert len(one([pat, observation("a", "anc", 2.5, low=3.0)], "granulocytes")) == 1
    assert one([pat, observation("a", "anc", 3.2, low=3.0)], "granulocytes") == []


def test_benign_ethnic_neutropenia_uses_threshold_1_0():
    rules = RULES.model_copy(update={"ben": RULES.ben.model_copy(update={"patients": ["p1"]})})
    assert flags_for([ADULT, observation("a", "anc", 1.2)], rules=rules) == []
    (spec,) = flags_for([ADULT, observation("a", "anc", 0.9)], rules=rules)
    assert spec.grade == 3


def test_comparator_less_than_counts_as_low_and_greater_never():
    (spec,) = one([ADULT, observation("a", "anc", 0.5, comparator="<")], "granulocytes")
    assert spec.condition == "agranulocytosis" and "ANC <0.5" in spec.text
    assert one([ADULT, observation("w", "wbc", 1.0, comparator=">")], "leukocytes") == []


def test_derived_anc_from_wbc_and_differential_same_panel():
    # ANC = 2.0 × (20 + 5) / 100 = 0.5 -> not < 0.5, so neutropenia G3 (moderate), marked derived.
    res = [
        ADULT,
        observation("w", "wbc", 2.0, time=False),
        observation("n", "neutrophils_pct", 20, time=False),
        observation("b", "bands_pct", 5, time=False),
        report("r1", ["w", "n", "b"], time=at()),
    ]
    (spec,) = one(res, "granulocytes")
    assert spec.condition == "neutropenia" and spec.grade == 3
    assert "(derived" in spec.text and set(spec.evidence) == {"Observation/w", "Observation/n", "Observation/b"}


def test_reported_anc_wins_over_derived():
    res = [ADULT, observation("w", "wbc", 2.0), observation("n", "neutrophils_pct", 10), observation("a", "anc", 1.6)]
    assert one(res, "granulocytes") == []


def test_agranulocytosis_replaces_neutropenia_in_one_episode():
    res = [
        ADULT,
        observation("a1", "anc", 1.2, time=at(0)),
        observation("a2", "anc", 0.3, time=at(days=2)),
        observation("a3", "anc", 0.8, time=at(days=4)),
    ]
    (spec,) = one(res, "granulocytes")
    assert spec.condition == "agranulocytosis" and spec.grade == 4 and spec.status == "active"
    assert spec.start.isoformat().startswith("2024-03-01T08:00")


# -- §2 lymphopenia: < 1.0 adults / unknown age, < 1.5 (2 – < 18 y), < 3.0 (< 2 y); grades 0.8 / 0.5 / 0.2 -----
@pytest.mark.parametrize(
    "birth, value, grade",
    [
        ("1970-01-01", 1.0, None),
        ("1970-01-01", 0.99, 1),
        ("1970-01-01", 0.8, 1),
        ("1970-01-01", 0.79, 2),
        ("1970-01-01", 0.5, 2),
        ("1970-01-01", 0.49, 3),
        ("1970-01-01", 0.2, 3),
        ("1970-01-01", 0.19, 4),
        (None, 0.99, 1),
        ("2015-01-01", 1.49, 1),
        ("2015-01-01", 1.5, None),
        ("2023-01-01", 2.99, 1),
        ("2023-01-01", 3.0, None),
    ],
)
def test_lymphopenia_age_thresholds_and_grades(birth, value, grade):
    specs = one([patient("p1", birth, "male"), observation("l", "lymphocytes_abs", value)], "lymphocytes")
    if grade is None:
        assert specs == []
    else:
        (spec,) = specs
        assert spec.code == "1156294003" and spec.grade == grade and spec.drugs == []


# -- §2 pancytopenia -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "gender, hb, plt, expect, grade",
    [
        ("male", 12.9, 149, True, 2),
        ("male", 13.0, 149, False, None),
        ("female", 11.9, 149, True, 2),
        ("female", 12.0, 100, False, None),
        ("male", 12.0, 150, False, None),
        ("male", 7.9, 20, True, 4),
    ],
)
def test_pancytopenia_one_blood_count(gender, hb, plt, expect, grade):
    res = [
        patient("p1", "1970-01-01", gender),
        observation("w", "wbc", 2.5),
        observation("h", "hemoglobin", hb, time=at(hours=3)),
        observation("p", "platelets", plt, time=at(hours=-3)),
    ]
    specs = one(res, "pancytopenia")
    assert bool(specs) is expect
    if expect:
        assert specs[0].code == "127034005" and specs[0].grade == grade


def test_pancytopenia_needs_values_within_24h():
    res = [
        ADULT,
        observation("w", "wbc", 2.5),
        observation("h", "hemoglobin", 9.0, time=at(hours=25)),
        observation("p", "platelets", 90),
    ]
    assert one(res, "pancytopenia") == []


# clinical-rules v1.1 §4: pancytopenia ends at the first later blood count that is not pancytopenic.
PANCYTOPENIC = [
    patient("p1", "1970-01-01", "male"),
    observation("w", "wbc", 2.5),
    observation("h", "hemoglobin", 9.0),
    observation("p", "platelets", 90),
]


@pytest.mark.parametrize(
    "later, ends",
    [
        (observation("w2", "wbc", 5.0, time=at(days=5)), True),  # a normal WBC alone closes it
        (observation("h2", "hemoglobin", 14.0, time=at(days=5)), True),  # so does a normal hemoglobin alone
        (observation("p2", "platelets", 200, time=at(days=5)), True),  # or a normal platelet count alone
        (observation("w2", "wbc", 2.0, time=at(days=5)), False),  # a low WBC alone cannot end it
        (observation("h2", "hemoglobin", 8.0, time=at(days=5)), False),  # nor a low hemoglobin alone
    ],
)
def test_pancytopenia_ends_at_the_first_count_that_is_not_pancytopenic(later, ends):
    (spec,) = one(PANCYTOPENIC + [later], "pancytopenia")
    if ends:
        assert spec.status == "inactive" and spec.end.isoformat() == "2024-03-06T08:00:00+00:00"
        assert spec.evidence[-1] == f"Observation/{later['id']}" and "normal again on 2024-03-06" in spec.text
    else:
        assert spec.status == "active" and spec.end is None


def test_pancytopenia_normal_wbc_inside_a_low_blood_count_ends_it():
    later = [
        observation("w2", "wbc", 4.5, time=at(days=5)),
        observation("h2", "hemoglobin", 9.0, time=at(days=5)),
        observation("p2", "platelets", 90, time=at(days=5)),
    ]
    (spec,) = one(PANCYTOPENIC + later, "pancytopenia")
    assert spec.status == "inactive" and spec.end.isoformat() == "2024-03-06T08:00:00+00:00"


def test_pancytopenia_child_hemoglobin_lln_11():
    child = patient("p1", "2014-01-01", "male")
    res = [child, observation("w", "wbc", 2.5), observation("h", "hemoglobin", 11.5), observation("p", "platelets", 90)]
    assert one(res, "pancytopenia") == []


# -- §3 drug association ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "start, end, associated",
    [
        (at(days=-100), None, True),  # ongoing since before the look-back
        (at(days=-120), at(days=-89), True),  # ended inside [t-90 d, t]
        (at(days=-120), at(days=-91), False),  # ended before the look-back
        (at(days=1), None, False),
    ],  # started after the finding
)
def test_drug_association_lookback(start, end, associated):
    res = [ADULT, observation("w", "wbc", 2.5), statement("m", "Clozapine 100 MG Oral Tablet", start=start, end=end)]
    (spec,) = one(res, "leukocytes")
    assert bool(spec.drugs) is associated
    assert ("possibly drug-associated: clozapine" in spec.text) is associated


@pytest.mark.parametrize(
    "coding, text, label",
    [
        ([{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "11118"}], None, "valproate"),
        ([{"system": "http://www.whocc.no/atc", "code": "L01XA01"}], None, "antineoplastic chemotherapy"),
        ([{"system": "http://www.whocc.no/atc", "code": "L03AB07"}], None, "interferon"),
        (None, "DIVALPROEX sodium 250 mg", "valproate (divalproex)"),
        (None, "Interferon beta-1a", "interferon"),
        (None, "Pemetrexed 500 MG Injection", "antineoplastic chemotherapy (pemetrexed)"),
        (None, "palbociclib 125 MG Oral Capsule", "antineoplastic chemotherapy (palbociclib)"),
    ],
)
def test_drug_identified_by_rxnorm_atc_or_name(coding, text, label):
    res = [ADULT, observation("w", "wbc", 2.5), statement("m", text, point=at(days=-5), coding=coding)]
    (spec,) = one(res, "leukocytes")
    assert spec.drugs == [(label, "MedicationStatement/m")]


# clinical-rules v1.1 §1.4: ATC only from the ATC system, RxNorm only from its system.
@pytest.mark.parametrize(
    "coding, label",
    [
        ({"system": "http://www.whocc.no/atc", "code": "L01XA01"}, "antineoplastic chemotherapy"),
        ({"system": "http://pharmacy.example/atc-batch-number", "code": "L01-7781"}, None),  # "atc" in the name only
        ({"system": "http://example.org/ATC-local", "code": "N05AH02"}, None),
        ({"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "2626"}, "clozapine"),
        ({"system": "http://example.org/formulary", "code": "2626"}, None),
    ],  # RxNorm's code, another system
)
def test_codes_are_read_only_from_their_own_system(coding, label):
    res = [ADULT, observation("w", "wbc", 2.5), statement("m", None, point=at(days=-5), coding=[coding])]
    (spec,) = one(res, "leukocytes")
    assert spec.drugs == ([(label, "MedicationStatement/m")] if label else [])


def test_the_configured_atc_system_is_the_one_read():
    oid = "urn:oid:2.16.840.1.113883.6.73"  # the HL7 OID of WHO ATC, which a site may use instead
    site = RULES.model_copy(update={"medications": RULES.medications.model_copy(update={"atc_system": oid})})
    res = [
        ADULT,
        observation("w", "wbc", 2.5),
        statement("m", None, point=at(days=-5), coding=[{"system": oid, "code": "L01XA01"}]),
        statement("n", None, point=at(days=-5), coding=[{"system": "http://www.whocc.no/atc", "code": "N05AH02"}]),
    ]
    (spec,) = flags_for(res, rules=site)
    assert spec.drugs == [("antineoplastic chemotherapy", "MedicationStatement/m")]


# clinical-rules v1.1 §1.4: a MedicationAdministration `not-done` was not given: no exposure.
@pytest.mark.parametrize(
    "status, associated", [("completed", True), ("in-progress", True), ("not-done", False), ("entered-in-error", False)]
)
def test_medication_administration_not_done_is_no_exposure(status, associated):
    res = [
        ADULT,
        observation("w", "wbc", 2.5),
        statement("m", "clozapine", point=at(days=-5), kind="MedicationAdministration", status=status),
    ]
    (spec,) = one(res, "leukocytes")
    assert spec.drugs == ([("clozapine", "MedicationAdministration/m")] if associated else [])


def test_name_must_be_a_whole_word():
    res = [ADULT, observation("w", "wbc", 2.5), statement("m", "Antimetronidazolex", point=at(days=-5))]
    assert one(res, "leukocytes")[0].drugs == []


def test_lymphopenia_is_never_drug_associated():
    res = [ADULT, observation("l", "lymphocytes_abs", 0.5), statement("m", "clozapine", point=at(days=-5))]
    assert one(res, "lymphocytes")[0].drugs == []


def test_medication_request_counts_and_cancelled_does_not():
    res = [
        ADULT,
        observation("w", "wbc", 2.5),
        statement("m1", "cisplatin 50 MG Injection", point=at(days=-10), kind="MedicationRequest"),
        statement("m2", "clozapine", point=at(days=-10), kind="MedicationRequest", status="cancelled"),
    ]
    (spec,) = one(res, "leukocytes")
    assert spec.drugs == [("antineoplastic chemotherapy (cisplatin)", "MedicationRequest/m1")]


def test_flag_text_names_the_agent_of_a_drug_class():
    # §3: the text names the drug(s); for a class (chemotherapy) the agent is named beside the class.
    res = [
        ADULT,
        observation("w", "wbc", 2.5),
        statement("m1", "Oxaliplatin 5 MG/ML Injectable Solution", point=at(days=-20)),
        statement("m2", "clozapine 25 MG Oral Tablet", point=at(days=-20)),
    ]
    (spec,) = one(res, "leukocytes")
    assert sorted(label for label, _ in spec.drugs) == ["antineoplastic chemotherapy (oxaliplatin)", "clozapine"]
    assert "possibly drug-associated: antineoplastic chemotherapy (oxaliplatin), clozapine" in spec.text


# -- §4 episodes, transient lows, resolution, escalation, retraction, identity -------------------------------------
def test_transient_low_within_72h_is_inactive_pseudoleukopenia():
    res = [ADULT, observation("w1", "wbc", 3.0, time=at(0)), observation("w2", "wbc", 5.0, time=at(hours=72))]
    (spec,) = one(res, "leukocytes")
    assert spec.status == "inactive" and spec.end is not None
    assert "transient low count, normal again within 72 h — consistent with pseudoleukopenia" in spec.text
    assert spec.evidence == ["Observation/w1", "Observation/w2"]


def test_resolution_after_72h_is_inactive_with_period_end():
    res = [
        ADULT,
        observation("w1", "wbc", 3.0, time=at(0)),
        observation("w2", "wbc", 2.2, time=at(days=3)),
        observation("w3", "wbc", 4.0, time=at(hours=73)),
    ]
    (spec,) = one(res, "leukocytes")
    assert spec.status == "inactive" and "transient" not in spec.text and "normal again on 2024-03-04" in spec.text
    assert spec.end.isoformat() == "2024-03-04T09:00:00+00:00" and spec.grade == 2


def test_open_episode_is_active_without_end_and_escalates():
    res = [
        ADULT,
        observation("w1", "wbc", 3.5, time=at(0)),
        observation("w2", "wbc", 0.9, time=at(days=5)),
        observation("w3", "wbc", 2.5, time=at(days=10)),
    ]
    (spec,) = one(res, "leukocytes")
    assert spec.status == "active" and spec.end is None and spec.grade == 4 and "WBC 0.9" in spec.text


def test_new_episode_after_recovery_has_new_identifier():
    res = [
        ADULT,
        observation("w1", "wbc", 3.5, time=at(0)),
        observation("w2", "wbc", 5.0, time=at(days=5)),
        observation("w3", "wbc", 3.0, time=at(days=10)),
    ]
    first, second = one(res, "leukocytes")
    assert first.status == "inactive" and second.status == "active" and first.identifier != second.identifier


def test_gap_longer_than_episode_gap_starts_a_new_episode():
    res = [ADULT, observation("w1", "wbc", 3.5, time=at(0)), observation("w2", "wbc", 3.0, time=at(days=91))]
    first, second = one(res, "leukocytes")
    assert first.status == "inactive" and second.status == "active"
    assert "no follow-up count for too long" in first.text


def test_monthly_low_counts_stay_one_episode():
    res = [ADULT] + [observation(f"w{i}", "wbc", 2.5, time=at(days=32 * i)) for i in range(4)]
    (spec,) = one(res, "leukocytes")
    assert spec.status == "active" and len(spec.evidence) == 4


def test_entered_in_error_only_evidence_retracts_the_flag():
    res = [ADULT, observation("w1", "wbc", 2.0, status="entered-in-error")]
    (spec,) = one(res, "leukocytes")
    assert spec.status == "entered-in-error"
    # The identifier is the one the Flag had while the Observation was final: the earlier Flag is withdrawn.
    (was,) = one([ADULT, observation("w1", "wbc", 2.0)], "leukocytes")
    assert spec.identifier == was.identifier


def test_entered_in_error_does_not_retract_real_evidence():
    res = [ADULT, observation("w0", "wbc", 2.0, time=at(-1), status="entered-in-error"), observation("w1", "wbc", 2.0)]
    specs = one(res, "leukocytes")
    assert sorted(s.status for s in specs) == ["active", "entered-in-error"]


# -- issue 9.3: several results of one concept at one instant --------------------------------------------------------
def test_simultaneous_results_never_lose_the_low_one():
    # WBC 2.1, 6.0 and 2.1 at 08:00: one episode opened by the low values, not closed by the normal one beside them
    # (recovery is a *later* value, §4), so exactly one Flag with one identifier.
    res = [ADULT, observation("w1", "wbc", 2.1), observation("w2", "wbc", 6.0), observation("w3", "wbc", 2.1)]
    (spec,) = one(res, "leukocytes")
    assert spec.status == "active" and spec.end is None and spec.grade == 2
    assert spec.evidence == ["Observation/w1", "Observation/w3"]


def test_simultaneous_results_take_the_worst_and_a_later_normal_value_closes():
    res = [
        ADULT,
        observation("w1", "wbc", 3.5),
        observation("w2", "wbc", 0.8),
        observation("w3", "wbc", 5.0),
        observation("w4", "wbc", 5.5, time=at(days=1)),
    ]
    (spec,) = one(res, "leukocytes")
    assert spec.grade == 4 and "WBC 0.8" in spec.text and spec.status == "inactive"
    assert spec.end.isoformat() == "2024-03-02T08:00:00+00:00" and spec.evidence[-1] == "Observation/w4"


@pytest.mark.parametrize("seed", range(3))
def test_simultaneous_results_give_unique_identifiers_in_any_order(seed):
    rng = random.Random(seed)
    res = [ADULT]
    for i in range(60):  # few instants, many values each: lows, normals, retractions, every family
        concept = rng.choice(["wbc", "anc", "lymphocytes_abs", "hemoglobin", "platelets", "neutrophils_pct"])
        scale = {
            "wbc": 4.0,
            "anc": 1.5,
            "lymphocytes_abs": 1.0,
            "hemoglobin": 12.0,
            "platelets": 150.0,
            "neutrophils_pct": 50.0,
        }[concept]
        res.append(
            observation(
                f"o{i}",
                concept,
                round(scale * rng.choice([0.2, 0.6, 0.9, 1.1, 1.5]), 2),
                time=at(days=rng.choice([0, 0, 0, 1, 10])),
                status=rng.choice(["final"] * 5 + ["entered-in-error"]),
            )
        )
    specs = flags_for(res)
    identifiers = [s.identifier for s in specs]
    assert specs and len(identifiers) == len(set(identifiers))
    shuffled = res[:]
    rng.shuffle(shuffled)
    assert [(s.identifier, s.status, s.grade, s.evidence) for s in flags_for(shuffled)] == [
        (s.identifier, s.status, s.grade, s.evidence) for s in specs
    ]


def test_preliminary_ignored_by_default():
    assert one([ADULT, observation("w", "wbc", 2.0, status="preliminary")]) == []


def test_identifiers_stable_across_runs_and_input_order():
    res = [
        ADULT,
        observation("w1", "wbc", 3.5, time=at(0)),
        observation("w2", "wbc", 5.0, time=at(days=5)),
        observation("a1", "anc", 0.4, time=at(days=7)),
        observation("l", "lymphocytes_abs", 0.3, time=at(days=8)),
    ]
    expected = [(s.identifier, s.status, s.code) for s in flags_for(res)]
    for seed in range(5):
        shuffled = res[:]
        random.Random(seed).shuffle(shuffled)
        assert [(s.identifier, s.status, s.code) for s in flags_for(shuffled)] == expected


def test_patients_do_not_mix():
    res = [
        ADULT,
        patient("p2"),
        observation("w1", "wbc", 3.0),
        observation("w2", "wbc", 5.0, patient="Patient/p2", time=at(hours=1)),
    ]
    (spec,) = one(res, "leukocytes")
    assert spec.patient_id == "Patient/p1" and spec.status == "active"


def test_as_of_ignores_later_values():
    from datetime import datetime, timezone

    res = [ADULT, observation("w1", "wbc", 3.0, time=at(0)), observation("w2", "wbc", 5.0, time=at(days=5))]
    (spec,) = flags_for(res, as_of=datetime(2024, 3, 2, tzinfo=timezone.utc))
    assert spec.status == "active"


# -- the vectorised pre-selection of patients (rules._patients_with_low_values) never changes a Flag ------------------
def _random_cohort(rng: random.Random, patients: int = 60) -> list[dict]:
    """Patients of every age band (neonates included), BEN, lab ranges or none, comparators, bands, derived ANC,
    retractions, values on both sides of every threshold, grouped in reports or not."""
    resources = []
    births = ["2024-02-25", "2024-01-20", "2023-06-01", "2019-03-03", "2012-07-07", "1950-01-01", None]
    concepts = ["wbc", "anc", "neutrophils_pct", "bands_pct", "lymphocytes_abs", "hemoglobin", "platelets"]
    scale = {
        "wbc": 6.0,
        "anc": 2.0,
        "neutrophils_pct": 60.0,
        "bands_pct": 5.0,
        "lymphocytes_abs": 1.6,
        "hemoglobin": 13.0,
        "platelets": 200.0,
    }
    for p in range(patients):
        pid = f"p{p}"
        resources.append(patient(pid, rng.choice(births), rng.choice(["male", "female", None])))
        for panel in range(rng.randint(1, 6)):
            when = at(hours=rng.randint(0, 24 * 200))
            ids = []
            for concept in rng.sample(concepts, rng.randint(1, len(concepts))):
                oid = f"o{p}-{panel}-{concept}"
                value = round(scale[concept] * rng.choice([0.05, 0.3, 0.6, 0.8, 0.95, 1.0, 1.2, 2.0]), 2)
                low = rng.choice([None, None, round(scale[concept] * rng.uniform(0.3, 1.5), 2)])
                resources.append(
                    observation(
                        oid,
                        concept,
                        value,
                        time=when,
                        patient=f"Patient/{pid}",
                        low=low,
                        comparator=rng.choice([None, None, None, "<", ">", ">=", "<="]),
                        status=rng.choice(["final"] * 8 + ["amended", "entered-in-error"]),
                    )
                )
                ids.append(oid)
            if rng.random() < 0.7:
                resources.append(report(f"r{p}-{panel}", ids, when, f"Patient/{pid}"))
    return resources


def _edge_patients() -> list[dict]:
    """One patient per way a value is low near a bound of the pre-selection, everything else normal."""
    out = []

    def add(pid, birth, *observations):
        out.append(patient(pid, birth, "female"))
        out.extend(o | {"subject": {"reference": f"Patient/{pid}"}} for o in observations)

    # Derived ANC only: WBC normal, 20 % neutrophils -> ANC 1.0 (§2 derived).
    add(
        "e-derived",
        "1970-01-01",
        observation("ed-w", "wbc", 5.0),
        observation("ed-n", "neutrophils_pct", 20.0),
        observation("ed-l", "lymphocytes_abs", 2.0),
    )
    # Adult ANC 1.2 with a lab range low of 1.0: judged against 1.5 (the lab range does not lower it).
    add("e-anc", "1970-01-01", observation("ea-a", "anc", 1.2, low=1.0))
    # Neonate (5 days): only the lab's range, 1.8 < 2.0.
    add("e-neonate", "2024-02-25", observation("en-a", "anc", 1.8, low=2.0))
    # `<4.0` against a lab LLN of 4.0: below it.
    add("e-less", "1970-01-01", observation("el-w", "wbc", 4.0, low=4.0, comparator="<"))
    # A child of 1 month, no lab range: WBC 5.5 < 6.0.
    add("e-child", "2024-01-20", observation("ec-w", "wbc", 5.5))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_patient_preselection_changes_no_flag(seed, monkeypatch):
    from leukofhir.evaluate import rules as engine
    from support.fhir_builders import normalise_all

    done = normalise_all(_random_cohort(random.Random(seed)) + _edge_patients(), RULES)
    kept = engine._patients_with_low_values(done.observations, done.patients, RULES)
    assert 0 < len(set(kept)) < done.observations["patient_id"].nunique()  # it does leave patients out
    fast = engine.evaluate(done.observations, done.patients, done.exposures, RULES)
    monkeypatch.setattr(
        engine, "_patients_with_low_values", lambda frame, patients, rules: frame["patient_id"].to_numpy()
    )
    every = engine.evaluate(done.observations, done.patients, done.exposures, RULES)
    assert fast == every and fast
    flagged = {spec.patient_id for spec in fast}
    assert {f"Patient/e-{name}" for name in ("derived", "anc", "neonate", "less", "child")} <= flagged


# -- §2 lymphopenia (v1.3 wording): below the LLN of §1.3, the lab's own range when present ----------------------------
@pytest.mark.parametrize(
    "value, lab_low, grade", [(0.9, 0.8, None), (0.79, 0.8, 2), (1.1, 1.3, 1), (1.3, 1.3, None), (0.9, None, 1)]
)
def test_lymphopenia_is_below_the_lab_lln_when_present_above_or_below_one(value, lab_low, grade):
    # A lab LLN of 0.8 spares a 0.9 the adult default (1.0) would call low; one of 1.3 calls a 1.1 low.
    specs = one([ADULT, observation("l", "lymphocytes_abs", value, low=lab_low)], "lymphocytes")
    assert [(s.condition, s.grade) for s in specs] == ([] if grade is None else [("lymphopenia", grade)])


# -- §4 Lapse (v1.3): an open episode whose family has had no value for more than the episode gap is closed ------------
LAPSED = "no follow-up count for more than 90 days"


def _as_of(days: float):
    from datetime import timedelta

    from support.fhir_builders import T0

    return T0 + timedelta(days=days)


def _lapse_case(resources, as_of_days, family):
    return [s for s in flags_for(resources, as_of=_as_of(as_of_days)) if s.family == family]


@pytest.mark.parametrize("days, lapsed", [(91, True), (90.001, True), (90, False), (89, False), (0, False)])
def test_a_single_low_value_lapses_strictly_more_than_90_days_later(days, lapsed):
    (spec,) = _lapse_case([ADULT, observation("w", "wbc", 3.0, time=at())], days, "leukocytes")
    if lapsed:
        assert (spec.status, spec.end) == ("inactive", _as_of(0))  # period.end = its last low value
        assert spec.text.endswith("; " + LAPSED) and "transient" not in spec.text
    else:
        assert (spec.status, spec.end) == ("active", None) and "follow-up" not in spec.text


def test_lapse_ends_at_the_last_low_value_and_keeps_the_worst_grade():
    res = [
        ADULT,
        observation("w1", "wbc", 3.5, time=at()),
        observation("w2", "wbc", 0.9, time=at(days=20)),
        observation("w3", "wbc", 2.5, time=at(days=40)),
    ]
    assert _lapse_case(res, 130, "leukocytes")[0].status == "active"  # 90 days after the last value, not the first
    (spec,) = _lapse_case(res, 131, "leukocytes")
    assert (spec.status, spec.end, spec.grade) == ("inactive", _as_of(40), 4)
    assert spec.evidence == ["Observation/w1", "Observation/w2", "Observation/w3"]


def test_a_short_lapsed_episode_is_never_transient():
    # Two low values an hour apart, then nothing: within 72 h of its start, but it did not recover.
    res = [ADULT, observation("w1", "wbc", 3.0, time=at()), observation("w2", "wbc", 3.1, time=at(hours=1))]
    (spec,) = _lapse_case(res, 100, "leukocytes")
    assert spec.status == "inactive" and spec.end == _as_of(1 / 24)
    assert "pseudoleukopenia" not in spec.text and "transient" not in spec.text and spec.text.endswith(LAPSED)


@pytest.mark.parametrize("as_of_days, second", [(210, "active"), (291, "inactive")])
def test_gap_and_lapse_together(as_of_days, second):
    # A low value, nothing, a low value 200 days later: the gap closes the first; the second lapses 90 days on.
    res = [ADULT, observation("w1", "wbc", 3.0, time=at()), observation("w2", "wbc", 2.0, time=at(days=200))]
    first, later = _lapse_case(res, as_of_days, "leukocytes")
    assert (first.status, first.end) == ("inactive", _as_of(0))
    assert "closed when a later episode began" in first.text and LAPSED not in first.text
    assert later.status == second and later.start == _as_of(200)
    assert (later.end, later.text.endswith(LAPSED)) == ((_as_of(200), True) if second == "inactive" else (None, False))


def test_a_recovery_is_not_a_lapse_however_late():
    res = [ADULT, observation("w1", "wbc", 3.0, time=at()), observation("w2", "wbc", 5.0, time=at(days=300))]
    (spec,) = _lapse_case(res, 400, "leukocytes")
    assert spec.end == _as_of(300) and "normal again on" in spec.text and LAPSED not in spec.text
    # As of a time before the recovery, it is set aside: the episode had lapsed then.
    (spec,) = _lapse_case(res, 100, "leukocytes")
    assert (spec.status, spec.end) == ("inactive", _as_of(0)) and spec.text.endswith(LAPSED)


def test_without_an_as_of_the_lapse_is_measured_at_the_latest_input_time():
    # p1's low WBC and, 100 days later, another patient's normal count: the input ends 100 days after p1's value.
    res = [
        ADULT,
        patient("p2"),
        observation("w1", "wbc", 3.0, time=at()),
        observation("w2", "wbc", 6.0, time=at(days=100), patient="Patient/p2"),
    ]
    (spec,) = flags_for(res)
    assert spec.status == "inactive" and spec.text.endswith(LAPSED)
    (spec,) = flags_for(res[:-1] + [observation("w2", "wbc", 6.0, time=at(days=60), patient="Patient/p2")])
    assert spec.status == "active"


def test_pancytopenia_lapses_without_a_complete_blood_count_while_leukopenia_goes_on():
    # A pancytopenic count, then monthly low WBCs without hemoglobin or platelets: leukopenia is followed, the
    # pancytopenia cannot be judged without all three, so it lapses 90 days after the last complete count.
    count = [
        observation("w0", "wbc", 2.0, time=at()),
        observation("h0", "hemoglobin", 9.0, time=at()),
        observation("p0", "platelets", 80, time=at()),
    ]
    monthly = [observation(f"w{i}", "wbc", 2.5, time=at(days=30 * i)) for i in range(1, 5)]
    specs = flags_for([ADULT] + count + monthly, as_of=_as_of(121))
    (pancytopenia,) = [s for s in specs if s.family == "pancytopenia"]
    (leukopenia,) = [s for s in specs if s.family == "leukocytes"]
    assert (pancytopenia.status, pancytopenia.end) == ("inactive", _as_of(0)) and pancytopenia.text.endswith(LAPSED)
    assert leukopenia.status == "active"
    # A second complete count (all three low) on day 60 keeps the pancytopenia followed until day 150.
    second = [
        observation("h2", "hemoglobin", 9.1, time=at(days=60)),
        observation("p2", "platelets", 81, time=at(days=60)),
    ]
    (pancytopenia,) = [
        s for s in flags_for([ADULT] + count + monthly + second, as_of=_as_of(121)) if s.family == "pancytopenia"
    ]
    assert pancytopenia.status == "active"


@pytest.mark.parametrize("derived_day, status", [(None, "inactive"), (60, "active")])
def test_granulocytes_lapse_and_a_derived_anc_is_a_value_of_theirs(derived_day, status):
    res = [ADULT, observation("a1", "anc", 0.4, time=at())]
    if derived_day is not None:  # WBC 3.0 × 30 % = ANC 0.9: a granulocyte value without a reported ANC
        res += [
            observation("w", "wbc", 3.0, time=at(days=derived_day)),
            observation("n", "neutrophils_pct", 30.0, time=at(days=derived_day)),
        ]
    (spec,) = _lapse_case(res, 121, "granulocytes")
    assert spec.status == status and (spec.text.endswith(LAPSED) is (status == "inactive"))
    assert spec.condition == "agranulocytosis" and spec.grade == 4


def test_a_wbc_alone_is_no_granulocyte_value():
    res = [ADULT, observation("a1", "anc", 1.2, time=at()), observation("w", "wbc", 6.0, time=at(days=60))]
    (spec,) = _lapse_case(res, 91, "granulocytes")
    assert spec.status == "inactive" and spec.text.endswith(LAPSED)


def test_lymphocytes_lapse():
    res = [ADULT, observation("l", "lymphocytes_abs", 0.6, time=at())]
    assert _lapse_case(res, 89, "lymphocytes")[0].status == "active"
    (spec,) = _lapse_case(res, 91, "lymphocytes")
    assert (spec.status, spec.end, spec.grade) == ("inactive", _as_of(0), 2) and spec.text.endswith(LAPSED)


def test_the_lapse_follows_the_episode_gap_setting(tmp_path):
    import yaml

    from leukofhir.config import DEFAULT_PATH

    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["windows"]["episode_gap"] = "30d"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data))
    rules = load_config(path)
    res = [ADULT, observation("w", "wbc", 3.0, time=at())]
    (spec,) = flags_for(res, rules, as_of=_as_of(31))
    assert spec.status == "inactive" and spec.text.endswith("; no follow-up count for more than 30 days")
    assert flags_for(res, rules, as_of=_as_of(29))[0].status == "active"


def test_a_retracted_episode_stays_entered_in_error_when_it_would_lapse():
    res = [ADULT, observation("w1", "wbc", 2.0, status="entered-in-error")]
    (spec,) = flags_for(res, as_of=_as_of(200))
    assert spec.status == "entered-in-error" and spec.end == _as_of(0) and "entered in error" in spec.text


def test_lapse_horizon_is_when_the_first_open_episode_would_lapse():
    from leukofhir.evaluate.rules import lapse_horizon

    res = [
        ADULT,
        patient("p2"),
        observation("w1", "wbc", 3.0, time=at()),
        observation("w2", "wbc", 3.0, time=at(days=10), patient="Patient/p2"),
    ]
    specs = flags_for(res, as_of=_as_of(20))
    assert lapse_horizon(specs, RULES) == _as_of(90)
    assert lapse_horizon(flags_for(res, as_of=_as_of(95)), RULES) == _as_of(100)  # p1 lapsed: p2's is next
    assert lapse_horizon(flags_for(res, as_of=_as_of(101)), RULES) is None
