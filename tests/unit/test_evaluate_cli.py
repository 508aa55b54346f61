"""`leukofhir evaluate` end to end: outputs, report reconciliation, bad input, exit codes (issue 3, item 5)."""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timezone

import pytest

import leukofhir.evaluate.pipeline as pipeline
import leukofhir.evaluate.stages as stages
from leukofhir.cli import main
from leukofhir.config import DEFAULT_PATH
from leukofhir.evaluate.rules import FlagSpec, evaluate
from leukofhir.evaluate.validate import ValidationThresholdError
from support.fhir_builders import at, observation, patient, statement


def _ndjson(path, resources, extra_lines=()):
    with open(path, "w") as fh:
        for r in resources:
            fh.write(json.dumps(r) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _ndjson(
        src / "Observation.ndjson",
        [
            observation("w1", "wbc", 2.5, time=at(0)),
            observation("w2", "wbc", 5.0, time=at(days=1)),  # transient: inactive
            observation("a1", "anc", 0.3, time=at(days=2)),  # agranulocytosis, drug-associated
            observation("u", "wbc", 5, unit="mg", time=at(days=2)),  # unknown unit -> GX quarantine
            observation("neg", "wbc", -1, time=at(days=2)),  # negative -> GX quarantine
            observation("nt", "wbc", 5, time=False),  # no time -> quarantine
            observation("o", "wbc", 5, code="30405-5"),  # out of scope -> skipped
        ],
        extra_lines=["{not json"],
    )
    with gzip.open(src / "Patient.ndjson.gz", "wt") as fh:
        fh.write(json.dumps(patient()) + "\n")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:ms1",
                "resource": statement("ms1", "clozapine", start=at(days=-30), patient_ref="urn:uuid:p1"),
            },
        ],
    }
    (src / "meds.json").write_text(json.dumps(bundle))
    return src


def test_evaluate_writes_outputs_that_add_up(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", str(inputs), "--out", str(out)]) == 0
    report_ = json.loads((out / "report.json").read_text())
    assert report_["read"] == {"MedicationStatement": 1, "Observation": 7, "Patient": 1}
    assert report_["read_total"] == 9 and report_["read_errors"] == 1
    total = report_["evaluated"] + sum(report_["skipped"].values()) + sum(report_["quarantined"].values())
    assert total == report_["read_total"] and report_["reconciled"]
    assert report_["skipped"]["code out of scope"] == 1
    assert sum(report_["quarantined"].values()) == 3
    flags = [json.loads(line) for line in (out / "Flag.ndjson").read_text().splitlines()]
    by_code = {f["code"]["coding"][0]["display"]: f for f in flags}
    assert by_code["Leukopenia"]["status"] == "inactive" and "pseudoleukopenia" in by_code["Leukopenia"]["code"]["text"]
    agran = by_code["Agranulocytosis"]
    assert agran["status"] == "active" and "clozapine" in agran["code"]["text"]
    assert any(e.get("valueReference", {}).get("reference") == "MedicationStatement/ms1" for e in agran["extension"])
    assert report_["flags"]["by_code_status"] == {"Agranulocytosis|active": 1, "Leukopenia|inactive": 1}
    assert report_["flags"]["per_day"] == {"2024-03-01": 1, "2024-03-03": 1}
    lines = [json.loads(line) for line in (out / "quarantine.ndjson").read_text().splitlines()]
    ids = sorted(q["resource"]["id"] for q in lines if "resource" in q)
    assert ids == ["neg", "nt", "u"]
    assert any(q.get("source", "").endswith("Observation.ndjson:8") for q in lines)
    assert all(q["reasons"] for q in lines)
    assert "Flags written" in capsys.readouterr().err
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html") and "Agranulocytosis" in html
    assert not (out / "report.html.partial").exists()


def test_identifiers_stable_across_runs(inputs, tmp_path):
    main(["evaluate", str(inputs), "--out", str(tmp_path / "a")])
    main(
        [
            "evaluate",
            str(inputs / "meds.json"),
            str(inputs / "Patient.ndjson.gz"),
            str(inputs / "Observation.ndjson"),
            "--out",
            str(tmp_path / "b"),
        ]
    )

    def read(d):
        return sorted(json.loads(x)["identifier"][0]["value"] for x in (tmp_path / d / "Flag.ndjson").open())

    assert read("a") == read("b") and len(read("a")) == 2


def test_unreadable_file_is_reported_and_run_goes_on(tmp_path, caplog):
    out = tmp_path / "out"
    (tmp_path / "nope.ndjson").symlink_to(tmp_path / "gone.ndjson")  # there, but nothing can be read from it
    assert main(["evaluate", str(tmp_path / "nope.ndjson"), "--out", str(out)]) == 0
    report_ = json.loads((out / "report.json").read_text())
    assert report_["read_errors"] == 1 and report_["read_total"] == 0
    # The user sees which file and why at once, not only a count.
    assert any("nope.ndjson: unreadable file" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # A named input that does not exist at all is an unusable argument (issue 9, item 8: tests/unit/test_bad_input.py).


def test_unusable_arguments_exit_non_zero(tmp_path, inputs, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["evaluate", str(inputs), "--out", str(blocker / "sub")]) == 2
    assert main(["evaluate", str(inputs), "--out", str(tmp_path / "o"), "--as-of", "soon"]) == 2
    bad = tmp_path / "rules.yaml"
    bad.write_text("version: 2\n")
    assert main(["evaluate", str(inputs), "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("leukofhir evaluate: error:") for line in err)


def test_as_of_skips_later_values(inputs, tmp_path):
    out = tmp_path / "out"
    assert main(["evaluate", str(inputs), "--out", str(out), "--as-of", "2024-03-01T12:00:00Z"]) == 0
    report_ = json.loads((out / "report.json").read_text())
    assert report_["skipped"]["after the as-of time"] == 2 and report_["reconciled"]
    (flag,) = [json.loads(x) for x in (out / "Flag.ndjson").open()]
    assert flag["status"] == "active"


def test_the_contract_can_fail_a_run_judged_on_its_files_but_never_offline_evaluate(inputs, tmp_path):
    """3 of the 6 Observations in scope fail (unknown unit, negative, no time), all of one patient."""
    # The default contract (at least 50 failing rows from 5 patients): one patient's three results are quarantined,
    # and the rest is evaluated.
    report_ = pipeline.evaluate_files([inputs], tmp_path / "run", progress=False, fail_on_threshold=True)
    assert sum(report_["quarantined"].values()) == 3 and report_["flags"]["total"] == 2
    suite = report_["contract"][0]
    assert (suite["suite"], suite["feed"], suite["failed"], suite["rows"], suite["patients"]) == (
        "observations",
        None,
        3,
        6,
        1,
    )
    # A site contract that judges even one patient's few rows (here, to see the message).
    site = tmp_path / "rules.yaml"
    rules_text = DEFAULT_PATH.read_text()
    assert "min_failing_rows: 50" in rules_text and "min_failing_patients: 5" in rules_text
    site.write_text(
        rules_text.replace("min_failing_rows: 50", "min_failing_rows: 1").replace(
            "min_failing_patients: 5", "min_failing_patients: 1"
        )
    )
    with pytest.raises(ValidationThresholdError) as caught:
        pipeline.evaluate_files([inputs], tmp_path / "judged", config=site, progress=False, fail_on_threshold=True)
    message = str(caught.value)
    assert message.startswith("observations: 3 of 6 rows (50.0%) from 1 patients fail validation")
    assert "expect_column_values_to_be_in_set(unit) 1 rows" in message and "Observation/u" in message
    assert "observations feed wbc in 'mg': 1 of 1 rows (100.0%)" in message
    assert not (tmp_path / "judged" / "report.json").exists()
    # Offline (the default, and `leukofhir evaluate`): the same input is quarantined and reported.
    report_ = pipeline.evaluate_files([inputs], tmp_path / "offline", config=site, progress=False)
    assert sum(report_["quarantined"].values()) == 3 and report_["reconciled"]
    # The site sets the rate and the minimum: 50 % of the rows, two failing rows at least, passes.
    site.write_text(
        site.read_text()
        .replace("max_failure_rate: 0.2", "max_failure_rate: 0.5")
        .replace("min_failing_rows: 1", "min_failing_rows: 2")
    )
    report_ = pipeline.evaluate_files([inputs], tmp_path / "site", config=site, progress=False, fail_on_threshold=True)
    assert report_["flags"]["total"] == 2


def test_a_flag_without_subject_fails_validation_and_is_not_written(inputs, tmp_path, monkeypatch):
    def without_subject(*args, **kwargs):
        specs = evaluate(*args, **kwargs)
        specs[0].patient_id = None
        return specs

    monkeypatch.setattr(stages, "evaluate", without_subject)
    report_ = pipeline.evaluate_files([inputs], tmp_path / "out", progress=False)
    assert report_["flags_rejected"] == 1 and report_["flags"]["total"] == 1
    flags = [json.loads(x) for x in (tmp_path / "out" / "Flag.ndjson").read_text().splitlines()]
    assert [f["subject"]["reference"] for f in flags] == ["Patient/p1"]
    subject = next(e for e in report_["expectations"] if e["suite"] == "flags" and e["column"] == "subject")
    assert subject["unexpected_count"] == 1 and not subject["success"]


def test_flag_rows_keep_a_missing_value_missing():
    spec = FlagSpec(
        identifier="a" * 40,
        patient_id=None,
        family="leukocytes",
        condition="leukopenia",
        code="84828003",
        display="Leukopenia",
        grade=2,
        status="active",
        start=datetime(2024, 1, 1, tzinfo=timezone.utc),
        end=None,
        text="",
        evidence=[],
    )
    rows = stages.flag_frame([spec])
    assert rows["subject"].isna().all()  # pandas 2's `str` dtype made it the text "None"
    assert rows["row_id"].tolist() == ["0"] and rows["identifier"].tolist() == ["a" * 40]


# -- issue 9: what the report and the quarantine say -------------------------------------------------------------------
def _quarantine(out):
    return [json.loads(x) for x in (out / "quarantine.ndjson").read_text().splitlines()]


def test_an_unknown_unit_is_counted_under_its_own_reason(tmp_path):
    _ndjson(tmp_path / "in.ndjson", [patient(), observation("u", "wbc", 5, unit="mg")])
    report_ = pipeline.evaluate_files([tmp_path / "in.ndjson"], tmp_path / "out", progress=False)
    assert report_["quarantined"] == {"expect_column_values_to_be_in_set(unit)": 1}
    (line,) = _quarantine(tmp_path / "out")
    assert line["reasons"][0] == "expect_column_values_to_be_in_set(unit): unknown unit 'mg' for wbc"


def test_copies_of_one_id_with_different_content_say_that_they_differ(tmp_path):
    first = {**observation("x", "wbc", 2.0), "meta": {"versionId": "1"}}
    other = {**observation("x", "wbc", 6.0), "meta": {"versionId": "1"}}  # same id and version, another value
    same = {**observation("y", "wbc", 2.0), "meta": {"versionId": "1"}}
    _ndjson(tmp_path / "in.ndjson", [patient(), first, other, same, same])
    report_ = pipeline.evaluate_files([tmp_path / "in.ndjson"], tmp_path / "out", progress=False)
    reasons = {
        (q["resource"]["id"], q["resource"]["valueQuantity"]["value"]): q["reasons"]
        for q in _quarantine(tmp_path / "out")
    }
    assert set(reasons) == {("x", 6.0), ("y", 2.0)}  # the first copy read goes on; the repeats are quarantined
    assert "differ" in reasons[("x", 6.0)][0] and "value" in reasons[("x", 6.0)][0]
    assert "identical" in reasons[("y", 2.0)][0] and not any("differ" in r for r in reasons[("y", 2.0)])
    assert len(report_["quarantined"]) == 2 and report_["reconciled"]


def test_simultaneous_results_leave_the_patient_with_a_flag(tmp_path):
    # issue 9.3: WBC 2.1, 6.0, 2.1 at 08:00 once gave two Flags with one identifier, both refused by the Flag suite.
    _ndjson(
        tmp_path / "in.ndjson",
        [patient(), observation("w1", "wbc", 2.1), observation("w2", "wbc", 6.0), observation("w3", "wbc", 2.1)],
    )
    report_ = pipeline.evaluate_files([tmp_path / "in.ndjson"], tmp_path / "out", progress=False)
    assert report_["flags_rejected"] == 0 and report_["flags"]["by_code_status"] == {"Leukopenia|active": 1}


def test_warnings_about_flags_not_written_are_capped_like_read_errors(inputs, tmp_path, monkeypatch, caplog):
    def duplicated(*args, **kwargs):
        (spec,) = [s for s in evaluate(*args, **kwargs) if s.display == "Leukopenia"]
        return [spec] * 100  # one identifier 100 times: the Flag suite refuses every one

    monkeypatch.setattr(stages, "evaluate", duplicated)
    report_ = pipeline.evaluate_files([inputs], tmp_path / "out", progress=False)
    assert report_["flags_rejected"] == 100
    shown = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "not written" in r.getMessage()]
    assert len(shown) == stages.SHOWN_READ_ERRORS + 1 and "more" in shown[-1]


def test_the_stages_run_on_their_own_as_an_online_run_would_chain_them(inputs, tmp_path):
    """evaluate_files is the five stages in a row; a caller (the online `run`) can chain them itself, passing the
    server's base URL so that its absolute references are local."""
    from leukofhir.config import load_config
    from leukofhir.evaluate.validate import suite_parameters

    rules = load_config()
    base = "https://fhir.example/r4"
    extra = tmp_path / "server.ndjson"
    _ndjson(
        extra,
        [
            observation("abs", "wbc", 1.5, patient=f"{base}/Patient/p1", time=at(days=3)),
            observation("far", "wbc", 1.5, patient="https://other.example/fhir/Patient/p1"),
        ],
    )
    paths = [inputs, extra]
    read = stages.read_and_normalise(paths, rules, base_url=base, progress=False)
    parameters = suite_parameters(rules)
    validated = stages.validate_rows(read.normalised, parameters)
    evaluation = stages.evaluate_rows(validated.observations, validated.exposures, read.normalised.patients, rules)
    checked = stages.build_flags(evaluation.specs, rules, parameters)
    report_, quarantined = stages.build_report(paths, read, validated, evaluation, checked)
    out = tmp_path / "staged"
    out.mkdir()
    pipeline.write_outputs(out, report_, checked.flags, quarantined, read)

    assert report_["reconciled"] and report_["quarantined"]["subject refers to another server"] == 1
    assert "Observation/abs" in {ref for spec in evaluation.specs for ref in spec.evidence}  # local under the base
    whole = pipeline.evaluate_files(paths, tmp_path / "whole", progress=False)  # offline: no base, both foreign
    assert whole["quarantined"]["subject refers to another server"] == 2
    lines = (out / "Flag.ndjson").read_text().splitlines()
    assert len(lines) == report_["flags"]["total"] and json.loads((out / "report.json").read_text()) == report_


# -- clinical-rules v1.3 §4 Lapse: offline as of --as-of (else the latest input time), online as of the run ------------
def test_as_of_closes_an_episode_without_a_count_for_more_than_90_days(tmp_path):
    _ndjson(tmp_path / "in.ndjson", [patient(), observation("w", "wbc", 2.5, time=at())])
    texts = {}
    for as_of in (None, "2024-05-30T08:00:00Z", "2024-05-30T08:00:01Z"):  # the latest input; 90 days; a second more
        out = tmp_path / f"out-{as_of}"
        assert (
            main(["evaluate", str(tmp_path / "in.ndjson"), "--out", str(out)] + (["--as-of", as_of] if as_of else []))
            == 0
        )
        (flag,) = [json.loads(x) for x in (out / "Flag.ndjson").open()]
        texts[as_of] = (flag["status"], flag["period"].get("end"), flag["code"]["text"])
    text = "Leukopenia — WBC 2.5 ×10^9/L on 2024-03-01, CTCAE v5.0 grade 2"
    assert texts == {
        None: ("active", None, text),
        "2024-05-30T08:00:00Z": ("active", None, text),
        "2024-05-30T08:00:01Z": ("inactive", at(), text + "; no follow-up count for more than 90 days"),
    }


def _chunk(tmp_path, started: str, resources: list[dict]):
    """A run folder as `leukofhir run` leaves it before its evaluate step: run.json and one staged batch."""
    chunk = tmp_path / "run" / "chunks" / "00001"
    (chunk / "staged").mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"server": "http://fhir.example/fhir", "started": started}))
    _ndjson(chunk / "staged" / "batch-00001.ndjson", resources)
    return chunk


def _evaluated(chunk):
    folder = chunk / "evaluated" / "batch-00001"
    flags = [json.loads(x) for x in (folder / "Flag.ndjson").read_text().splitlines()]
    return json.loads((folder / "report.json").read_text()), flags


def test_an_online_run_evaluates_as_of_its_start(tmp_path):
    from leukofhir.config import load_config
    from leukofhir.run import evaluate_chunk

    chunk = _chunk(tmp_path, "2024-06-01T00:00:00+00:00", [patient(), observation("w", "wbc", 2.5, time=at())])
    evaluate_chunk(load_config(), chunk)
    report_, (flag,) = _evaluated(chunk)
    assert report_["as_of"] == "2024-06-01T00:00:00+00:00"  # not the batch's latest time (2024-03-01)
    assert flag["status"] == "inactive" and flag["code"]["text"].endswith("no follow-up count for more than 90 days")


def test_a_result_newer_than_the_run_start_is_evaluated_not_set_aside(tmp_path):
    from leukofhir.config import load_config
    from leukofhir.run import evaluate_chunk

    # Written while the run read: a recovery timed after the run started still closes the episode.
    resources = [patient(), observation("w", "wbc", 2.5, time=at()), observation("ok", "wbc", 6.0, time=at(days=2))]
    chunk = _chunk(tmp_path, at(days=1), resources)
    evaluate_chunk(load_config(), chunk)
    report_, (flag,) = _evaluated(chunk)
    assert "after the as-of time" not in report_["skipped"] and report_["as_of"] == "2024-03-03T08:00:00+00:00"
    assert (
        flag["status"] == "inactive" and flag["period"]["end"] == at(days=2) and "normal again" in flag["code"]["text"]
    )
