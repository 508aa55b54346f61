"""Fuzz: mutated FHIR lines and FHIR-shaped JSON through reader → normalise → validate → evaluate (issue 9).

No exception escapes; every input line is accounted for (lines = read + read errors, and read = evaluated + skipped
+ quarantined); and the Flags of the valid patients are the same with and without the garbage beside them.
Bounded to about a minute (max_examples below)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from leukofhir.config import load_config
from leukofhir.evaluate.pipeline import evaluate_files
from support.fhir_builders import at, observation, patient, report, statement

RULES = load_config()
AS_OF = "2024-03-20T00:00:00Z"  # fixed: by default the as-of is the latest input time, which garbage may move
KEEP = "keep"  # every id and reference of the valid data holds it; garbage never may (checked, see _mentions)

VALID = [
    patient("keep-p1", birth="1950-01-01"),
    patient("keep-p2", birth="1980-06-01", gender="male"),
    patient("keep-p3", birth="2001-02-03"),
    observation("keep-o1", "wbc", 1.8, time=at(0), patient="Patient/keep-p1"),
    observation("keep-o2", "wbc", 2.1, time=at(days=3), patient="Patient/keep-p1"),
    observation("keep-o3", "anc", 0.4, time=at(days=1), patient="Patient/keep-p2"),
    observation("keep-o4", "lymphocytes_abs", 0.3, time=at(days=2), patient="Patient/keep-p3"),
    observation("keep-o5", "wbc", 6.0, time=at(days=5), patient="Patient/keep-p3"),
    observation("keep-o6", "platelets", 40, time=at(days=1), patient="Patient/keep-p2"),
    observation("keep-o7", "hemoglobin", 7.5, time=at(days=1), patient="Patient/keep-p2"),
    statement("keep-m1", "clozapine", start=at(days=-30), patient_ref="Patient/keep-p2"),
    report("keep-r1", ["keep-o3", "keep-o6", "keep-o7"], time=at(days=1), patient_ref="Patient/keep-p2"),
]
VALID_LINES = [json.dumps(r).encode() for r in VALID]

# Garbage is made from valid FHIR about other patients, so that a mutation leaves most of a resource standing.
TEMPLATES = [
    json.dumps(r).encode()
    for r in [
        patient("g1"),
        patient("g2", birth=None),
        observation("g-o1", "wbc", 1.1, time=at(days=2), patient="Patient/g1", low=4.0),
        observation("g-o2", "anc", 0.2, time=at(days=4), patient="Patient/g2", comparator="<"),
        observation("g-o3", "lymphocytes_abs", 0.5, time=at(days=1), patient="urn:uuid:g1"),
        observation("g-o4", "neutrophils_pct", 12, time=at(days=1), patient="Patient/g1"),
        statement("g-m1", "valproate", start=at(days=-10), patient_ref="Patient/g1", kind="MedicationRequest"),
        report("g-r1", ["g-o1", "g-o4"], time=at(days=2), patient_ref="Patient/g1"),
    ]
]


def _mutate(line: bytes, edits) -> bytes:
    data = bytearray(line)
    for kind, where, payload in edits:
        at_ = int(where * len(data))
        if kind == "replace" and data:
            data[min(at_, len(data) - 1)] = payload[0] if payload else 0
        elif kind == "insert":
            data[at_:at_] = payload
        elif kind == "delete":
            del data[at_ : at_ + max(1, len(payload))]
        elif kind == "truncate":
            del data[at_:]
        elif kind == "repeat":
            data[at_:at_] = data[at_ : at_ + len(payload) + 1]
    return bytes(data)


edits = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete", "truncate", "repeat"]),
        st.floats(0, 1),
        st.binary(min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=4,
)
mutated_lines = st.builds(_mutate, st.sampled_from(TEMPLATES), edits)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(
        [
            "Patient/g1",
            "urn:uuid:g2",
            "2024-03-02",
            "final",
            "10*9/L",
            "%",
            "<",
            "6690-2",
            "751-8",
            "http://loinc.org",
            "Observation/g-o1",
            "Medication/g",
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
    max_leaves=16,
)
fhir_keys = st.sampled_from(
    [
        "id",
        "status",
        "code",
        "subject",
        "effectiveDateTime",
        "effectivePeriod",
        "valueQuantity",
        "referenceRange",
        "meta",
        "result",
        "birthDate",
        "gender",
        "medicationCodeableConcept",
        "medicationReference",
        "authoredOn",
        "dataAbsentReason",
        "hasMember",
        "component",
        "issued",
        "valueString",
    ]
)
shaped = st.builds(
    lambda kind, body: json.dumps({"resourceType": kind, **body}, allow_nan=True).encode(),
    st.sampled_from(
        [
            "Observation",
            "Patient",
            "DiagnosticReport",
            "MedicationStatement",
            "MedicationRequest",
            "MedicationAdministration",
            "Medication",
            "Condition",
            "Flag",
            "Specimen",
            "observation",
            "",
        ]
    ),
    st.dictionaries(fhir_keys, json_values, max_size=6),
)
deep = st.builds(
    lambda depth, brackets: (
        b'{"resourceType":"Observation","id":"g-d","x":' + brackets[0] * depth + b"0" + brackets[1] * depth + b"}"
    ),
    st.integers(90, 1200),
    st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]),
)
garbage_lines = st.one_of(mutated_lines, mutated_lines, shaped, st.binary(max_size=40), deep)


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _mentions(line: bytes) -> tuple[bool, bool]:
    """(mentions the valid data, is a Bundle): garbage that names a valid patient or resource may rightly change
    its Flags, and a Bundle line holds many resources; both are left out of the comparison."""
    if KEEP.encode() in line.lower():
        return True, False
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return False, False
    bundle = isinstance(value, dict) and value.get("resourceType") == "Bundle"
    return any(KEEP in s.lower() for s in _strings(value)), bundle


def _valid_flags(out) -> list[str]:
    flags = [json.loads(line) for line in (out / "Flag.ndjson").read_text(encoding="utf-8").splitlines()]
    return sorted(json.dumps(f, sort_keys=True) for f in flags if KEEP in f["subject"]["reference"])


@pytest.fixture(scope="module")
def valid_flags(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-valid")
    (folder / "in.ndjson").write_bytes(b"\n".join(VALID_LINES) + b"\n")
    report = evaluate_files([folder / "in.ndjson"], folder / "out", as_of=AS_OF, config=RULES, progress=False)
    flags = _valid_flags(folder / "out")
    assert report["reconciled"] and len(flags) >= 3 and report["read_errors"] == 0
    return flags


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(garbage=st.lists(st.tuples(st.integers(0, len(VALID_LINES)), garbage_lines), min_size=1, max_size=12))
def test_garbage_beside_valid_data_crashes_nothing_loses_nothing_and_changes_no_valid_flag(
    tmp_path_factory, valid_flags, garbage
):
    for _, line in garbage:
        mentions, bundle = _mentions(line)
        assume(not mentions and not bundle)
    lines = list(VALID_LINES)
    for position, line in sorted(garbage, key=lambda g: -g[0]):
        lines.insert(position, line)
    data = b"\n".join(lines) + b"\n"
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "in.ndjson").write_bytes(data)

    report = evaluate_files([folder / "in.ndjson"], folder / "out", as_of=AS_OF, config=RULES, progress=False)

    # Every line is accounted for: a resource read, or a read error (a blank line holds nothing).
    written = data.split(b"\n")[:-1]
    non_blank = sum(1 for line in written if line.strip(b" \t\r"))
    assert report["read_total"] + report["read_errors"] == non_blank
    placed = report["evaluated"] + sum(report["skipped"].values()) + sum(report["quarantined"].values())
    assert placed == report["read_total"] and report["reconciled"]
    quarantine = (folder / "out" / "quarantine.ndjson").read_text(encoding="utf-8").split("\n")
    assert quarantine.pop() == "" and len(quarantine) == sum(report["quarantined"].values()) + report["read_errors"]
    # The valid patients' Flags do not depend on the garbage beside them.
    assert _valid_flags(folder / "out") == valid_flags
