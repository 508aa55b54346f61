"""Bounded memory (leukofhir.evaluate.partition): an input above the memory budget, partitioned by patient, gives the
outputs of the in-memory path byte for byte, whatever crosses patients; the counts still reconcile."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import pytest
from conftest import EXTERNAL

from leukofhir.cli import main
from leukofhir.errors import UsageError
from leukofhir.evaluate.partition import (
    DEFAULT_MEMORY_BUDGET,
    ROW_COST_OBSERVATION,
    ROW_COST_OTHER,
    ROW_COSTS,
    estimate_rows,
    input_bytes,
    parse_size,
    plan_partitions,
)
from leukofhir.evaluate.pipeline import evaluate_files
from leukofhir.evaluate.validate import ValidationThresholdError
from leukofhir.extract.reader import expand_paths
from support.fhir_builders import at, observation, patient, report, statement

# Report entries that may legitimately differ: which ids illustrate a reason, and the partitioning itself.
EXAMPLE_KEYS = {"quarantine_examples", "expectations", "contract", "partitions"}


def _run(inputs, out: Path, **options) -> dict:
    return evaluate_files(inputs, out, progress=False, **options)


def _same_outputs(memory: Path, memory_report: dict, partitioned: Path, partitioned_report: dict) -> None:
    for name in ("Flag.ndjson", "quarantine.ndjson"):
        assert (partitioned / name).read_bytes() == (memory / name).read_bytes(), name
    assert {k: v for k, v in partitioned_report.items() if k not in EXAMPLE_KEYS} == {
        k: v for k, v in memory_report.items() if k not in EXAMPLE_KEYS
    }
    strip = [{k: v for k, v in e.items() if k != "examples"} for e in memory_report["expectations"]]
    assert [{k: v for k, v in e.items() if k != "examples"} for e in partitioned_report["expectations"]] == strip
    strip = [{k: v for k, v in e.items() if k != "examples"} for e in memory_report["contract"]]
    assert [{k: v for k, v in e.items() if k != "examples"} for e in partitioned_report["contract"]] == strip
    assert partitioned_report["reconciled"] is True
    written = json.loads((partitioned / "report.json").read_text())
    assert written["partitions"] == partitioned_report["partitions"]


def test_the_sample_data_with_a_tiny_budget_gives_the_in_memory_flags_byte_for_byte(tmp_path):
    memory = _run([EXTERNAL], tmp_path / "memory")
    assert "partitions" not in memory and memory["flags"]["total"] > 100 and memory["read_errors"] == 3
    partitioned = _run([EXTERNAL], tmp_path / "partitioned", memory_budget="2MB")
    parts = partitioned["partitions"]
    assert parts["evaluated"] >= 4 and parts["spilled"] > parts["evaluated"]
    # The HL7 General Health Panel's report names another patient than its results: two partitions judged as one.
    assert parts["linked_groups"] >= 1
    _same_outputs(tmp_path / "memory", memory, tmp_path / "partitioned", partitioned)
    assert not list((tmp_path / "partitioned").glob(".partitions-*")), "the partitions' files are removed"


def _write_ndjson(path: Path, resources: list[dict], *, gz: bool = False) -> None:
    text = "".join(json.dumps(r) + "\n" for r in resources)
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def _crossing_input(folder: Path) -> Path:
    """Patients whose resources cross partitions in every way the partitioned path must resolve."""
    folder.mkdir()
    patients = [patient(f"p{n}", birth="1960-01-01") for n in range(40)]
    first, later = [], []
    for n in range(40):
        ref = f"Patient/p{n}"
        first += [
            observation(f"w{n}-a", "wbc", 2.1 + n / 100, time=at(days=n), patient=ref, meta={"versionId": "1"}),
            observation(f"w{n}-b", "wbc", 6.0, time=at(days=n + 3), patient=ref),
        ]
    # A copy of p1's low WBC read again under p2 (another subject): quarantined as a differing copy, p2 unflagged.
    later.append(observation("w1-a", "wbc", 2.11, time=at(days=1), patient="Patient/p2", meta={"versionId": "1"}))
    # A correction that moves a result to the right patient: version 2 under p4 supersedes version 1 under p3.
    later.append(observation("w3-a", "wbc", 2.13, time=at(days=3), patient="Patient/p4", meta={"versionId": "2"}))
    # p5's report lists p6's untimed ANC: the result takes the report's time.
    later.append(observation("u6", "anc", 0.4, time=False, patient="Patient/p6"))
    later.append(report("r5", ["u6", "w5-a"], time=at(days=50), patient_ref="Patient/p5"))
    # One Medication, referenced by MedicationRequests of patients in many partitions; one copy of it read later
    # changes nothing (the same drug), a second Medication appears only after its requests.
    medication = {"resourceType": "Medication", "id": "cis", "code": {"text": "Cisplatin 50 MG Injection"}}
    requests = []
    for n in range(0, 40, 3):
        request = statement(f"mr{n}", None, point=at(days=n - 5), kind="MedicationRequest", patient_ref=f"Patient/p{n}")
        del request["medicationCodeableConcept"]
        request["medicationReference"] = {"reference": "Medication/cis" if n % 2 else "Medication/clz"}
        requests.append(request)
    late_medication = {"resourceType": "Medication", "id": "clz", "code": {"text": "Clozapine 100 MG Oral Tablet"}}
    # urn:uuid and bare-id subjects resolve to the Patients of the input, wherever those are read.
    untyped = [
        observation("x7", "wbc", 1.7, time=at(days=60), patient="urn:uuid:p7"),
        observation("x8", "wbc", 1.8, time=at(days=61), patient="p8"),
        observation("x99", "wbc", 1.9, time=at(days=62), patient="urn:uuid:nobody"),
    ]
    # A Bundle whose references name entries by fullUrl.
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:0a0a0a0a-0000-4000-8000-000000000001", "resource": patient("b1", birth="1950-02-02")},
            {
                "fullUrl": "urn:uuid:0a0a0a0a-0000-4000-8000-000000000002",
                "resource": observation(
                    "b1-w", "wbc", 1.2, time=at(days=70), patient="urn:uuid:0a0a0a0a-0000-4000-8000-000000000001"
                ),
            },
        ],
    }
    _write_ndjson(folder / "a-Patient.ndjson", patients[:20])
    _write_ndjson(folder / "b-Observation.ndjson.gz", first, gz=True)
    _write_ndjson(folder / "c-Medication.ndjson", [medication])
    _write_ndjson(folder / "d-MedicationRequest.ndjson", requests)
    _write_ndjson(folder / "e-later.ndjson", later + untyped + [medication, late_medication])
    (folder / "f-bad.ndjson").write_text('{"resourceType": "Observation", "id": "cut"\n{"no": "type"}\n')
    (folder / "g-bundle.json").write_text(json.dumps(bundle))
    _write_ndjson(folder / "h-Patient.ndjson", patients[20:] + [{"resourceType": "Encounter", "id": "e1"}])
    return folder


@pytest.mark.parametrize("budget, workers", [("1KB", 1), ("20KB", 1), ("1KB", 2)])
def test_what_crosses_patients_is_resolved_as_in_memory(tmp_path, budget, workers):
    inputs = _crossing_input(tmp_path / "in")
    memory = _run([inputs], tmp_path / "memory")
    assert "partitions" not in memory
    partitioned = _run([inputs], tmp_path / "partitioned", memory_budget=budget, workers=workers)
    assert partitioned["partitions"]["evaluated"] >= 2 and partitioned["partitions"]["workers"] == workers
    _same_outputs(tmp_path / "memory", memory, tmp_path / "partitioned", partitioned)
    # What the in-memory path made of the crossings, so the comparison above covers each of them.
    quarantine = [json.loads(line) for line in (tmp_path / "memory" / "quarantine.ndjson").read_text().splitlines()]
    reasons = {q.get("resource", {}).get("id") or q.get("source"): q["reasons"][0] for q in quarantine}
    assert "differs in subject" in reasons["w1-a"]
    assert reasons["x99"] == "subject does not resolve to a Patient in the input"
    assert sum(1 for q in quarantine if "source" in q) == memory["read_errors"] == 2
    assert memory["skipped"]["superseded by a later version"] == 1
    flags = [json.loads(line) for line in (tmp_path / "memory" / "Flag.ndjson").read_text().splitlines()]
    by_patient = {}
    for flag in flags:
        by_patient.setdefault(flag["subject"]["reference"], []).append(flag)
    assert "Patient/p3" not in by_patient and "Patient/p4" in by_patient  # the correction moved the episode
    assert any("Agranulocytosis" in f["code"]["text"] for f in by_patient["Patient/p6"])  # timed by p5's report
    assert {"Patient/p7", "Patient/p8", "Patient/b1"} <= set(by_patient)
    drugs = [f["code"]["text"] for f in flags if "possibly drug-associated" in f["code"]["text"]]
    assert any("cisplatin" in t for t in drugs) and any("clozapine" in t for t in drugs)


def test_an_as_of_given_holds_for_every_partition(tmp_path):
    inputs = _crossing_input(tmp_path / "in")
    memory = _run([inputs], tmp_path / "memory", as_of=at(days=20))
    partitioned = _run([inputs], tmp_path / "partitioned", as_of=at(days=20), memory_budget="2KB")
    assert memory["skipped"]["after the as-of time"] > 0
    _same_outputs(tmp_path / "memory", memory, tmp_path / "partitioned", partitioned)


def _lapse_input(folder: Path) -> Path:
    """Forty patients with an open episode each, their last low values 100 days apart at most, and one later count:
    most partitions end earlier than the input, and some of their episodes lapse only by its end (v1.3 §4)."""
    folder.mkdir()
    resources = [patient(f"p{n}", birth="1960-01-01") for n in range(41)]
    resources += [observation(f"w{n}", "wbc", 2.5, time=at(days=n * 3), patient=f"Patient/p{n}") for n in range(40)]
    resources.append(observation("late", "wbc", 6.0, time=at(days=190), patient="Patient/p40"))
    _write_ndjson(folder / "in.ndjson", resources)
    return folder


@pytest.mark.parametrize("workers", [1, 2])
def test_without_an_as_of_every_partition_lapses_as_of_the_input_end(tmp_path, workers, caplog):
    inputs = _lapse_input(tmp_path / "in")
    memory = _run([inputs], tmp_path / "memory")
    with caplog.at_level("INFO", logger="leukofhir.evaluate.partition"):
        partitioned = _run([inputs], tmp_path / "partitioned", memory_budget="1KB", workers=workers)
    assert partitioned["partitions"]["evaluated"] >= 4
    assert "evaluated again as of the input's latest time" in caplog.text  # what this test is about did happen
    _same_outputs(tmp_path / "memory", memory, tmp_path / "partitioned", partitioned)
    flags = [json.loads(line) for line in (tmp_path / "memory" / "Flag.ndjson").read_text().splitlines()]
    # As of day 190: a last value before day 100 lapsed, one on day 100 or later is still followed.
    assert sorted({f["status"] for f in flags if f["period"]["start"] < at(days=100)}) == ["inactive"]
    assert sorted({f["status"] for f in flags if f["period"]["start"] >= at(days=100)}) == ["active"]
    assert memory["as_of"] == partitioned["as_of"] == "2024-09-07T08:00:00+00:00"


def test_a_run_time_holds_for_every_partition(tmp_path):
    inputs = _lapse_input(tmp_path / "in")
    memory = _run([inputs], tmp_path / "memory", run_time=at(days=150))
    partitioned = _run([inputs], tmp_path / "partitioned", run_time=at(days=150), memory_budget="1KB")
    _same_outputs(tmp_path / "memory", memory, tmp_path / "partitioned", partitioned)
    # The later count (day 190) is evaluated, not set aside: the run's time only moves the lapse forward.
    assert "after the as-of time" not in memory["skipped"] and memory["as_of"] == "2024-09-07T08:00:00+00:00"
    later = _run([inputs], tmp_path / "later", run_time=at(days=400), memory_budget="1KB")
    assert later["as_of"] == "2025-04-05T08:00:00+00:00" and later["flags"]["by_status"] == {"inactive": 40}


def test_the_validation_threshold_is_checked_on_the_totals(tmp_path):
    """Mostly bad data fails a run against a server with the same error in memory and partitioned; a partition that
    is all bad data does not fail a run whose totals pass."""
    folder = tmp_path / "in"
    folder.mkdir()
    # 60 results in a unit nobody knows, from 30 patients: a feed, above the contract's minimum of 50 rows, 5 patients.
    bad = [observation(f"bad{n}", "wbc", 3.0, unit="furlongs", patient=f"Patient/q{n % 30}") for n in range(60)]
    good = [observation(f"ok{n}", "wbc", 5.0, patient=f"Patient/q{n}") for n in range(20)]
    _write_ndjson(folder / "obs.ndjson", bad + good + [patient(f"q{n}") for n in range(30)])
    errors = []
    for budget in (None, "1KB"):
        with pytest.raises(ValidationThresholdError) as caught:
            _run([folder], tmp_path / f"out-{budget}", fail_on_threshold=True, memory_budget=budget)
        errors.append(re.sub(r"e\.g\. [^;]*", "e.g. …", str(caught.value)))  # which ids: any of them
        assert not (tmp_path / f"out-{budget}" / "report.json").exists()
    assert errors[0] == errors[1] and "observations: 60 of 80 rows (75.0%) from 30 patients" in errors[0]
    assert "observations feed wbc in 'furlongs': 60 of 60 rows" in errors[0]

    _write_ndjson(folder / "obs.ndjson", bad[:3] + good * 1 + [patient(f"q{n}") for n in range(30)])
    done = _run([folder], tmp_path / "passes", fail_on_threshold=True, memory_budget="1KB")
    assert done["partitions"]["evaluated"] >= 2 and sum(done["quarantined"].values()) == 3


def test_sizes_and_the_plan():
    assert parse_size("64MB") == 64 << 20 and parse_size("1.5GB") == 3 << 29 and parse_size("512KiB") == 512 << 10
    assert parse_size("100000") == 100000 and parse_size(2048) == 2048
    for bad in ("lots", "-1MB", "0", "12 parsecs"):
        with pytest.raises(UsageError):
            parse_size(bad)
    files = expand_paths([EXTERNAL])
    assert plan_partitions(files) is None  # the sample data fits the default budget
    plan = plan_partitions(files, "1MB", workers=2)
    assert plan.budget == 1 << 20 and plan.workers == 2 and plan.unit_budget == 1 << 19
    assert 2 <= plan.spilled <= 256
    assert DEFAULT_MEMORY_BUDGET == 768 << 20
    with pytest.raises(UsageError):
        plan_partitions(files, "1MB", workers=0)


def test_the_command_line_takes_a_budget_and_workers(tmp_path, capsys):
    assert main(["evaluate", str(EXTERNAL / "hl7-fhir-r4-examples"), "--out", str(tmp_path / "a")]) == 0
    assert (
        main(
            [
                "evaluate",
                str(EXTERNAL / "hl7-fhir-r4-examples"),
                "--out",
                str(tmp_path / "b"),
                "--memory-budget",
                "8KB",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    assert "partitions by patient" in capsys.readouterr().err
    assert (tmp_path / "a" / "Flag.ndjson").read_bytes() == (tmp_path / "b" / "Flag.ndjson").read_bytes()
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", str(EXTERNAL), "--out", str(tmp_path / "c"), "--memory-budget", "lots"])
    assert exited.value.code == 2 and "not a size" in capsys.readouterr().err
    # Data Docs need every row in memory: refused before anything is written.
    assert main(["evaluate", str(EXTERNAL), "--out", str(tmp_path / "d"), "--memory-budget", "1MB", "--data-docs"]) == 2
    assert "--data-docs needs every row in memory" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def _cbc_input(folder: Path, patients: int, per_patient: int, *, padding: int = 0) -> Path:
    """Patients with `per_patient` WBC results each, a low one among them; `padding` characters of note per result
    make the same rows take more bytes (verbose JSON), and change nothing the rules read."""
    folder.mkdir(parents=True)
    results = []
    for p in range(patients):
        for n in range(per_patient):
            extra = {"note": [{"text": "x" * padding}]} if padding else {}
            results.append(
                observation(
                    f"o{p}-{n}", "wbc", 1.2 if n == 3 else 6.0, time=at(days=n * 2), patient=f"Patient/c{p}", **extra
                )
            )
    _write_ndjson(folder / "Patient.ndjson", [patient(f"c{p}") for p in range(patients)])
    _write_ndjson(folder / "Observation.ndjson", results)
    return folder


def test_the_estimate_counts_rows_whatever_their_bytes(tmp_path):
    """The rows estimated from samples of each file (plain or .gz, and a file longer than its samples) are about the
    rows it holds; compact and verbose JSON of the same rows give the same estimate of memory."""
    compact = expand_paths([_cbc_input(tmp_path / "compact", 400, 20)])
    verbose = expand_paths([_cbc_input(tmp_path / "verbose", 400, 20, padding=700)])
    rows = 400 * 21
    assert input_bytes(verbose) > 3 * input_bytes(compact)  # a file of the verbose input is sampled, not read whole
    for files in (compact, verbose):
        estimated_rows, memory = estimate_rows(files)
        assert rows <= estimated_rows < rows * 1.1
        assert 400 * 20 * ROW_COST_OBSERVATION <= memory < rows * ROW_COST_OBSERVATION * 1.1
    gz = tmp_path / "gz"
    gz.mkdir()
    _write_ndjson(
        gz / "Observation.ndjson.gz",
        [json.loads(line) for line in (tmp_path / "compact" / "Observation.ndjson").read_text().splitlines()],
        gz=True,
    )
    estimated_rows, memory = estimate_rows([gz / "Observation.ndjson.gz"])
    assert 8000 <= estimated_rows < 8800 and memory == pytest.approx(estimated_rows * ROW_COST_OBSERVATION, rel=0.01)
    # Kinds the rules never read cost nothing; a Medication is held as context.
    other = tmp_path / "other.ndjson"
    _write_ndjson(
        other,
        [{"resourceType": "Encounter", "id": f"e{n}"} for n in range(50)]
        + [{"resourceType": "Medication", "id": "m1"}],
    )
    assert estimate_rows([other]) == (1, ROW_COSTS["Medication"]) and ROW_COSTS["Medication"] == ROW_COST_OTHER


@pytest.mark.parametrize("padding", [0, 700])
def test_a_compact_input_is_packed_by_its_rows_not_its_bytes(tmp_path, padding, caplog):
    """Many rows in few bytes: the partitions are packed by the rows the first pass counted, so each evaluated
    partition's rows fit one process's share of the budget, and compact JSON is cut into as many partitions as verbose
    JSON of the same rows, more than its bytes would ask for."""
    inputs = _cbc_input(tmp_path / "in", 400, 20, padding=padding)
    rows = 400 * 21
    memory = _run([inputs], tmp_path / "memory")
    held = 8000 * ROW_COST_OBSERVATION + 400 * ROW_COST_OTHER  # what the rows take in memory
    budget = held // 6
    with caplog.at_level("INFO", logger="leukofhir.evaluate.partition"):
        partitioned = _run([inputs], tmp_path / "partitioned", memory_budget=budget, workers=2)
    parts = partitioned["partitions"]
    assert f"{parts['evaluated']} partitions: rows estimated at up to" in caplog.text
    assert parts["memory_budget"] == budget and rows <= parts["estimated_rows"] < rows * 1.1
    units = parts["units"]
    assert len(units) == parts["evaluated"] and sum(u["rows"] for u in units) == rows
    assert sum(u["estimated"] for u in units) == held and all(u["estimated"] <= budget // 2 for u in units)
    assert parts["largest_estimated"] == max(u["estimated"] for u in units)
    # Rows x cost: at least 12 partitions (6 budgets, 2 workers), whatever the bytes per row; by bytes (the budget
    # as 0.8 byte of memory per byte of JSON, before), the compact input would have had fewer, each above its share.
    assert parts["evaluated"] >= math.ceil(held / (budget // 2)) >= 12
    if not padding:
        assert math.ceil(input_bytes(expand_paths([inputs])) * 0.8 / (budget // 2)) < 12
    # Each partition's process measured its own peak (the process's base and its rows).
    assert all(u["peak_rss"] > 50 << 20 for u in units)
    assert parts["largest_peak_rss"] == max(u["peak_rss"] for u in units)
    _same_outputs(tmp_path / "memory", memory, tmp_path / "partitioned", partitioned)


def _evaluate_in_daemon(inputs: list, out: Path) -> None:
    _run(inputs, out, memory_budget="2MB")


def test_a_daemonic_process_such_as_a_celery_task_partitions_in_itself(tmp_path):
    # Celery's task processes are daemonic, and multiprocessing forbids them children: the units run in the process.
    import multiprocessing

    memory = _run([EXTERNAL], tmp_path / "memory")
    process = multiprocessing.get_context("fork").Process(
        target=_evaluate_in_daemon, args=([EXTERNAL], tmp_path / "partitioned"), daemon=True
    )
    process.start()
    process.join(600)
    assert process.exitcode == 0
    partitioned = json.loads((tmp_path / "partitioned" / "report.json").read_text())
    assert partitioned["partitions"]["evaluated"] >= 4
    _same_outputs(tmp_path / "memory", memory, tmp_path / "partitioned", partitioned)
