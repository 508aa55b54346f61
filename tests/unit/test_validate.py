"""The GX data contract: every expectation fails one row and passes another; parameters come from the rules config."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from leukofhir.config import DEFAULT_PATH, load_config
from leukofhir.errors import ConfigError
from leukofhir.evaluate.validate import (
    EXPECTATIONS_DIR,
    ValidationThresholdError,
    check_contract,
    contract_counts,
    load_suite,
    suite_parameters,
    validate_batch,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def parameters():
    return suite_parameters(load_config(), now=NOW)


def observations(**target) -> pd.DataFrame:
    """A WBC and an ANC of one panel; `target` changes the ANC row (row_id "t")."""
    rows = [
        dict(row_id="w", resource_id="Observation/w1", version="1", concept="wbc", code="6690-2", value=5.0),
        dict(row_id="t", resource_id="Observation/a1", version="1", concept="anc", code="751-8", value=2.0),
    ]
    for row in rows:
        row.update(
            patient_id="Patient/p1",
            comparator=None,
            unit="10*9/L",
            status="final",
            time=pd.Timestamp("2025-02-01T08:00:00Z"),
            lln=np.nan,
            panel="DiagnosticReport/d1",
        )
    rows[1].update(target)
    frame = pd.DataFrame(rows)
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    return frame


def exposures(**target) -> pd.DataFrame:
    row = dict(
        row_id="t",
        resource_id="MedicationStatement/m1",
        patient_id="Patient/p1",
        drug="clozapine",
        start=pd.Timestamp("2025-01-01T00:00:00Z"),
        end=pd.Timestamp("2025-02-01T00:00:00Z"),
        status="active",
    )
    row.update(target)
    frame = pd.DataFrame([row])
    for column in ("start", "end"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def flags(**target) -> pd.DataFrame:
    other = dict(
        row_id="o",
        identifier="https://leukofhir.org/fhir/flag-episode|aaa",
        status="active",
        code="165517008",
        subject="Patient/p1",
    )
    row = dict(other, row_id="t", identifier="https://leukofhir.org/fhir/flag-episode|bbb")
    row.update(target)
    return pd.DataFrame([other, row])


# (suite, expectation and column as GX reports them, change that violates it, change that passes, reason text)
CASES = [
    ("observations", "expect_column_values_to_not_be_null(resource_id)", {"resource_id": None}, {}, "value missing"),
    ("observations", "expect_column_values_to_not_be_null(patient_id)", {"patient_id": None}, {}, "value missing"),
    ("observations", "expect_column_values_to_not_be_null(time)", {"time": pd.NaT}, {}, "value missing"),
    (
        "observations",
        "expect_column_values_to_not_be_null(value)",
        {"value": np.nan, "unit": "10*9/L"},
        {},
        "value missing: unit '10*9/L' cannot be converted to the unit of anc (§1.2)",
    ),
    (
        "observations",
        "expect_column_values_to_be_in_set(unit)",
        {"unit": "10*12/L"},
        {"unit": "/uL"},
        "unknown unit '10*12/L' for anc",
    ),
    (
        "observations",
        "expect_column_values_to_be_in_set(status)",
        {"status": "preliminary"},
        {"status": "corrected"},
        "value 'preliminary' not accepted",
    ),
    (
        "observations",
        "expect_column_values_to_be_between(time)",
        {"time": pd.Timestamp("2025-03-01T12:11:00Z")},
        {"time": pd.Timestamp("2025-03-01T12:09:00Z")},
        "value 2025-03-01T12:11:00+00:00 above 2025-03-01T12:10:00+00:00",
    ),
    (
        "observations",
        "expect_column_values_to_be_between(value)",
        {"value": -0.1},
        {"value": 0.0},
        "value -0.1 below 0.0",
    ),
    (
        "observations",
        "expect_column_pair_values_a_to_be_greater_than_b(plausible_max, value)",
        {"concept": "wbc", "panel": None, "value": 1000.5},
        {"concept": "wbc", "panel": None, "value": 1000.0},
        "value 1000.5 above plausible_max 1000.0",
    ),
    (
        "observations",
        "expect_column_values_to_be_between(earlier_copies)",
        {"resource_id": "Observation/w1", "concept": "wbc", "code": "6690-2", "value": 5.0},
        {"resource_id": "Observation/w1", "concept": "wbc", "code": "6690-2", "value": 5.0, "version": "2"},
        "an identical copy of this id and version was read before it: the first copy goes on",
    ),
    (
        "observations",
        "expect_column_values_to_be_between(differing_copies)",
        {"resource_id": "Observation/w1"},
        {"resource_id": "Observation/w1", "version": "2"},
        "another copy of this id and version, read before it, differs in code, value: the first copy read goes on, "
        "this one is quarantined",
    ),
    (
        "observations",
        "expect_column_pair_values_a_to_be_greater_than_b(panel_wbc, value)",
        {"value": 5.5},
        {"value": 5.0},
        "value 5.5 above panel_wbc 5.0",
    ),
    ("exposures", "expect_column_values_to_not_be_null(patient_id)", {"patient_id": None}, {}, "value missing"),
    ("exposures", "expect_column_values_to_not_be_null(drug)", {"drug": None}, {}, "value missing"),
    (
        "exposures",
        "expect_column_pair_values_a_to_be_greater_than_b(end, start)",
        {"end": pd.Timestamp("2024-12-31T00:00:00Z")},
        {"end": pd.NaT},
        "start 2025-01-01T00:00:00+00:00 after end 2024-12-31T00:00:00+00:00",
    ),
    (
        "flags",
        "expect_column_values_to_be_in_set(status)",
        {"status": "resolved"},
        {"status": "inactive"},
        "value 'resolved' not accepted",
    ),
    (
        "flags",
        "expect_column_values_to_be_in_set(code)",
        {"code": "30405-5"},
        {"code": "17182001"},
        "value '30405-5' not accepted",
    ),
    ("flags", "expect_column_values_to_not_be_null(subject)", {"subject": None}, {}, "value missing"),
    ("flags", "expect_column_values_to_not_be_null(identifier)", {"identifier": None}, {}, "value missing"),
    (
        "flags",
        "expect_column_values_to_be_unique(identifier)",
        {"identifier": "https://leukofhir.org/fhir/flag-episode|aaa"},
        {},
        "value 'https://leukofhir.org/fhir/flag-episode|aaa' occurs more than once",
    ),
]
BUILD = {"observations": observations, "exposures": exposures, "flags": flags}


@pytest.mark.parametrize("suite, expectation, bad, good, why", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_expectation_fails_the_violating_row_and_passes_the_other(parameters, suite, expectation, bad, good, why):
    result = validate_batch(suite, BUILD[suite](**bad), parameters)
    assert f"{expectation}: {why}" in "\n".join(result.reasons.get("t", [])), result.reasons
    assert "t" not in set(result.valid["row_id"])
    summary = next(e for e in result.expectations if f"{e['name']}({e['column']})" == expectation)
    assert summary["success"] is False and summary["unexpected_count"] >= 1 and summary["examples"]

    result = validate_batch(suite, BUILD[suite](**good), parameters)
    assert result.reasons == {}
    assert list(result.valid["row_id"]) == list(BUILD[suite](**good)["row_id"])
    assert all(e["success"] for e in result.expectations)


def test_every_expectation_in_the_suites_has_a_case():
    in_files = set()
    for suite in BUILD:
        spec = json.loads((EXPECTATIONS_DIR / f"{suite}.json").read_text())
        for e in spec["expectations"]:
            k = e["kwargs"]
            columns = k.get("column") or f"{k['column_A']}, {k['column_B']}"
            in_files.add((suite, f"{e['type']}({columns})"))
    assert in_files == {(c[0], c[1]) for c in CASES}


def test_suites_load_from_the_json_files_and_keep_rule_values_out():
    for suite in BUILD:
        path = EXPECTATIONS_DIR / f"{suite}.json"
        loaded = load_suite(path)
        assert loaded.name == suite
        assert len(loaded.expectations) == len(json.loads(path.read_text())["expectations"])
    text = (EXPECTATIONS_DIR / "observations.json").read_text() + (EXPECTATIONS_DIR / "flags.json").read_text()
    # Units, statuses, codes and bounds come from rules.yaml as $PARAMETERs, never as literals in the suites.
    for literal in ("10*9/L", "final", "84828003", "1000"):
        assert literal not in text
    assert '"$PARAMETER": "accepted_units"' in text


def test_a_suite_with_an_unbuildable_expectation_is_refused(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(
        json.dumps(
            {
                "name": "broken",
                "expectations": [
                    {"type": "expect_column_values_to_not_be_null", "kwargs": {}},
                ],
            }
        )
    )
    with pytest.raises(ConfigError, match="broken.json"):
        load_suite(path)


def test_parameters_follow_the_rules_file(tmp_path):
    """Changing rules.yaml changes what the suites accept: preliminary results count when the site enables them."""
    rules = yaml.safe_load(Path(DEFAULT_PATH).read_text(encoding="utf-8"))
    rules["observations"]["statuses"]["preliminary_counts"] = True
    rules["units"]["count"]["10*12/L"] = 1000
    rules["validation"]["plausible_max"]["wbc"] = 500
    site = tmp_path / "site-rules.yaml"
    site.write_text(yaml.safe_dump(rules, allow_unicode=True), encoding="utf-8")
    params = suite_parameters(load_config(site), now=NOW)
    assert "preliminary" in params["accepted_statuses"] and "10*12/L" in params["accepted_units"]
    assert validate_batch("observations", observations(status="preliminary", unit="10*12/L"), params).reasons == {}
    too_high = validate_batch("observations", observations(concept="wbc", panel=None, value=600.0), params)
    assert too_high.reasons["t"] == [
        "expect_column_pair_values_a_to_be_greater_than_b(plausible_max, value): value 600.0 above plausible_max 500.0"
    ]

    default = suite_parameters(load_config(), now=NOW)
    assert default["flag_codes"] == sorted(["84828003", "165517008", "17182001", "1156294003", "127034005"])
    assert default["latest_time"] == pd.Timestamp(NOW) + timedelta(minutes=10)


def test_a_resource_read_twice_goes_on_once(parameters):
    """The first copy is evaluated, the repeat quarantined: nothing lost, nothing counted twice."""
    frame = pd.concat([observations(), observations().iloc[[1]].assign(row_id="again")], ignore_index=True)
    result = validate_batch("observations", frame, parameters)
    assert list(result.valid["row_id"]) == ["w", "t"]
    assert result.reasons == {
        "again": [
            "expect_column_values_to_be_between(earlier_copies): an identical copy of "
            "this id and version was read before it: the first copy goes on"
        ]
    }


@pytest.mark.parametrize(
    "change, fields",
    [
        ({"value": 2.5}, "value"),
        ({"value": 2.5, "time": pd.Timestamp("2025-01-02T00:00:00Z")}, "value, time"),
        ({"status": "amended"}, "status"),
        ({"patient_id": "Patient/p2"}, "subject"),
        ({"lln": 4.5}, "reference range"),
    ],
)
def test_a_copy_with_other_content_says_how_it_differs(parameters, change, fields):
    """Copies of one id and version should be the same resource; when they are not, the reason says so and how."""
    copy = observations().iloc[[1]].assign(row_id="again", **change)
    third = observations().iloc[[1]].assign(row_id="third")  # identical to the first copy
    result = validate_batch("observations", pd.concat([observations(), copy, third], ignore_index=True), parameters)
    assert list(result.valid["row_id"]) == ["w", "t"]
    assert result.reasons["again"][0] == (
        f"expect_column_values_to_be_between(differing_copies): another copy of this id and version, read before it, "
        f"differs in {fields}: the first copy read goes on, this one is quarantined"
    )
    assert len(result.reasons["again"]) == 1
    assert result.reasons["third"] == [
        "expect_column_values_to_be_between(earlier_copies): an identical copy of "
        "this id and version was read before it: the first copy goes on"
    ]


def test_all_failing_row_ids_are_returned_not_a_sample(parameters):
    frame = pd.concat(
        [observations(row_id=f"r{i}", resource_id=f"Observation/x{i}", unit="10*12/L").iloc[[1]] for i in range(300)]
        + [observations()],
        ignore_index=True,
    )
    result = validate_batch("observations", frame, parameters)
    assert set(result.reasons) == {f"r{i}" for i in range(300)}
    assert sorted(result.valid["row_id"]) == ["t", "w"]
    unit = next(e for e in result.expectations if e["column"] == "unit")
    assert unit["unexpected_count"] == 300 and len(unit["examples"]) == 5


def test_contract_failure_names_the_expectation_and_resource_ids(parameters):
    frame = pd.concat(
        [observations(row_id=f"r{i}", resource_id=f"Observation/x{i}", unit="10*12/L").iloc[[1]] for i in range(3)]
        + [observations()],
        ignore_index=True,
    )
    # A batch never raises for its failing rows: they are quarantined, and counted for the contract.
    result = validate_batch("observations", frame, parameters)
    assert len(result.reasons) == 3
    # With a contract that judges these few rows (a site's, for the test), the message names the suite and the
    # feed, the expectation and the resource ids.
    settings = SimpleNamespace(max_failure_rate=0.5, min_failing_rows=1, min_failing_patients=1)
    with pytest.raises(ValidationThresholdError) as caught:
        check_contract(contract_counts("observations", (frame, result.reasons)), settings)
    message = str(caught.value)
    assert "expect_column_values_to_be_in_set(unit)" in message
    assert "Observation/x0" in message and "observations: 3 of 5 rows" in message
    assert "observations feed anc in '10*12/L': 3 of 3 rows (100.0%) from 1 patients" in message
    # At the rate of the whole suite (3 of 5) it is the feed alone that fails: all of its rows are in a wrong unit.
    at_rate = SimpleNamespace(max_failure_rate=0.6, min_failing_rows=1, min_failing_patients=1)
    with pytest.raises(ValidationThresholdError) as caught:
        check_contract(contract_counts("observations", (frame, result.reasons)), at_rate)
    assert str(caught.value).startswith("observations feed anc in '10*12/L': 3 of 3 rows")
    # The default contract (at least 50 failing rows from 5 patients) never stops for three results of one patient.
    check_contract(contract_counts("observations", (frame, result.reasons)), load_config().validation)


def test_an_empty_batch_validates(parameters):
    result = validate_batch("observations", observations().iloc[0:0], parameters)
    assert result.reasons == {} and result.valid.empty


def test_a_concept_without_a_plausible_range_is_a_config_error(parameters):
    narrow = dict(parameters, plausible_max={"wbc": 1000.0})
    with pytest.raises(ConfigError, match="anc"):
        validate_batch("observations", observations(), narrow)


def test_validation_prints_no_progress_bars(parameters, capfd):
    validate_batch("observations", observations(), parameters)
    out, err = capfd.readouterr()
    assert "Calculating Metrics" not in out + err


def test_tz_aware_period_check_raises_no_pandas_warning(parameters):
    """GX reads a failing column pair through Series.values (deprecated for tz-aware columns in pandas 3.1)."""
    import warnings

    # pandas 2 has no Pandas4Warning: there, its deprecations are FutureWarnings.
    deprecation = getattr(pd.errors, "Pandas4Warning", FutureWarning)
    bad = exposures(end=pd.Timestamp("2024-12-31T00:00:00Z"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", deprecation)
        result = validate_batch("exposures", bad, parameters)
    assert result.reasons == {
        "t": [
            "expect_column_pair_values_a_to_be_greater_than_b(end, start): "
            "start 2025-01-01T00:00:00+00:00 after end 2024-12-31T00:00:00+00:00"
        ]
    }
    assert str(result.valid["start"].dtype) == str(bad["start"].dtype)  # the caller's rows keep their zone


def test_validation_owns_the_gx_loggers(parameters):
    import logging

    validate_batch("observations", observations(), parameters)
    assert logging.getLogger("great_expectations").level == logging.WARNING


def test_a_missing_suite_file_says_where_to_point(tmp_path):
    with pytest.raises(ConfigError, match="LEUKOFHIR_EXPECTATIONS_DIR"):
        load_suite(tmp_path / "observations.json")


def test_gx_still_reads_the_fingerprint_threshold_we_lower():
    """validate.py lowers GX's HASH_THRESHOLD to skip a whole-batch hash; a GX upgrade that drops it must show."""
    import inspect

    from great_expectations.execution_engine import pandas_execution_engine

    source = inspect.getsource(pandas_execution_engine.PandasExecutionEngine.get_batch_data_and_markers)
    assert "HASH_THRESHOLD" in source


def test_gx_still_names_expectation_types_through_the_function_we_remember():
    """validate.py remembers camel_to_snake where GX's Expectation.configuration calls it; the names stay GX's."""
    import inspect

    from great_expectations.expectations import expectation
    from great_expectations.util import camel_to_snake

    from leukofhir.evaluate.validate import prepare

    prepare()
    assert "camel_to_snake(self.__class__.__name__)" in inspect.getsource(expectation.Expectation.configuration.fget)
    assert hasattr(expectation.camel_to_snake, "cache_info")
    for name in ("ExpectColumnValuesToBeInSet", "ExpectColumnPairValuesAToBeGreaterThanB"):
        assert expectation.camel_to_snake(name) == camel_to_snake(name)
