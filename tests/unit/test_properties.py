"""Property tests: arbitrary JSON never crashes normalise/evaluate, and every resource lands in exactly one bucket."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leukofhir.config import load_config
from leukofhir.evaluate.pipeline import evaluate_files
from leukofhir.evaluate.rules import evaluate
from support.fhir_builders import at, normalise_all, observation

RULES = load_config()
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(
        ["Patient/p1", "urn:uuid:p1", "2024-01-01", "final", "10*9/L", "/uL", "<", "6690-2", "http://loinc.org"]
    ),
)
json_values = st.recursive(
    scalars,
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=10), c, max_size=5)),
    max_leaves=20,
)


def mutated_observation():
    keys = st.sampled_from(
        [
            "status",
            "code",
            "subject",
            "effectiveDateTime",
            "valueQuantity",
            "referenceRange",
            "effectivePeriod",
            "dataAbsentReason",
            "meta",
            "id",
        ]
    )
    base = st.builds(
        lambda c, v, t: observation("o", c, v, time=at(hours=t)),
        st.sampled_from(["wbc", "anc", "lymphocytes_abs", "hemoglobin", "platelets", "neutrophils_pct"]),
        st.floats(-10, 2000, allow_nan=False),
        st.integers(-500, 500),
    )
    return st.builds(lambda b, changes: {**b, **changes}, base, st.dictionaries(keys, json_values, max_size=3))


resources = st.one_of(
    mutated_observation(),
    st.dictionaries(st.text(max_size=8), json_values, max_size=5).map(lambda d: {**d, "resourceType": "Observation"}),
    st.builds(
        lambda d, kind: {**d, "resourceType": kind},
        st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        st.sampled_from(
            ["Patient", "DiagnosticReport", "MedicationStatement", "MedicationRequest", "Medication", "Specimen"]
        ),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(resources, max_size=8))
def test_normalise_and_evaluate_never_crash_and_buckets_partition(items):
    for i, item in enumerate(items):
        if isinstance(item.get("id"), str) is False:
            item["id"] = f"r{i}"
    done = normalise_all(items, RULES)
    placed = len(done.observations) + len(done.exposures) + sum(done.skipped.values()) + len(done.quarantined)
    assert placed + done.evaluated_other == len(items)
    quarantined = [q[0] for q in done.quarantined]
    assert len(quarantined) == len(set(quarantined))
    specs = evaluate(done.observations, done.patients, done.exposures, RULES)
    assert len({s.identifier for s in specs}) == len(specs)  # one identifier per episode, or the Flag suite refuses


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.lists(resources, min_size=1, max_size=6), st.lists(st.text(max_size=20), max_size=2))
def test_pipeline_report_always_reconciles(tmp_path_factory, items, junk_lines):
    folder = tmp_path_factory.mktemp("prop")
    with open(folder / "in.ndjson", "w") as fh:
        for i, item in enumerate(items):
            item.setdefault("id", f"r{i}")
            fh.write(json.dumps(item) + "\n")
        for line in junk_lines:
            fh.write(line.replace("\n", " ") + "\n")
    report = evaluate_files([str(folder / "in.ndjson")], folder / "out", progress=False)
    assert report["reconciled"] and report["read_total"] == len(items)
    # NDJSON lines end at "\n" only: str.splitlines() would also split at U+0085, U+2028 etc. inside a line.
    lines = (folder / "out" / "quarantine.ndjson").read_text(encoding="utf-8").split("\n")
    assert lines.pop() == ""  # every line ends with "\n", the empty file included
    assert len(lines) == sum(report["quarantined"].values()) + report["read_errors"]
