"""`leukofhir run` against the real server: the data contract judges feeds, not single patients (issue 17, item 4).

One patient's broken results are quarantined and never block another patient's Flags; the Flags do not depend on the
batching; a broken feed stops the whole run before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from leukofhir.cli import main
from support.contract_data import BAD, broken_feed_on, flags_by_place, held_out, held_out_ids, recent
from support.fhir_builders import observation, patient
from support.server_data import project_flags, put

pytestmark = pytest.mark.fhir

CLI = [sys.executable, "-m", "leukofhir.cli"]


def run(url: str, out, *patients: str, batch_size: int | None = None) -> int:
    """`leukofhir run --patients ...`, in this process (the console script's own main)."""
    return main(
        ["run", "--fhir-url", url, "--patients", ",".join(patients), "--out", str(out)]
        + (["--batch-size", str(batch_size)] if batch_size else [])
    )


def quarantine(folder) -> dict[str, list[str]]:
    return {
        q["resource"]["id"]: q["reasons"]
        for q in map(json.loads, (folder / "quarantine.ndjson").open())
        if "resource" in q
    }


def test_one_run_batches_and_one_patient_at_a_time_give_the_same_flags(
    fhir_base_url, fhir_client, unique, tmp_path, capsys
):
    batchings = {}
    # One run over all 13 patients (one batch).
    ids = held_out_ids(f"one-{unique}")
    put(fhir_client, *held_out(f"one-{unique}"))
    assert run(fhir_base_url, tmp_path / "one", *ids) == 0
    batchings["one run"] = flags_by_place(fhir_client, ids)
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    bad = ids[BAD]
    # The bad patient's broken results are quarantined with their reasons; its valid low WBC is evaluated.
    reasons = quarantine(tmp_path / "one")
    assert set(reasons) == {f"{bad}-unit", f"{bad}-text"}
    assert reasons[f"{bad}-unit"] == [
        "expect_column_values_to_be_in_set(unit): unknown unit 'furlong' for wbc",
        "expect_column_values_to_not_be_null(value): value missing: unit 'furlong' cannot be converted to the unit of "
        "wbc (§1.2)",
    ]
    assert reasons[f"{bad}-text"] == ["value is not a Quantity with a numeric value"]
    assert [f[0] for f in batchings["one run"][BAD]] == ["active"]
    assert report["contract_verdict"] == {"passed": True, "message": None}
    (furlong,) = [s for s in report["contract"] if s["feed"] == {"concept": "wbc", "unit": "furlong"}]
    assert (furlong["failed"], furlong["rows"], furlong["patients"]) == (1, 1, 1)

    # One run in batches of four patients.
    ids = held_out_ids(f"four-{unique}")
    put(fhir_client, *held_out(f"four-{unique}"))
    assert run(fhir_base_url, tmp_path / "four", *ids, batch_size=4) == 0
    assert json.loads((tmp_path / "four" / "report.json").read_text())["chunks"] == 4
    batchings["batches of 4"] = flags_by_place(fhir_client, ids)

    # One patient at a time, as the near-real-time path runs them.
    ids = held_out_ids(f"each-{unique}")
    put(fhir_client, *held_out(f"each-{unique}"))
    for n, pid in enumerate(ids):
        assert run(fhir_base_url, tmp_path / f"each{n}", pid) == 0, capsys.readouterr().err
    batchings["one patient at a time"] = flags_by_place(fhir_client, ids)

    # The bad patient batched with a good one, as the receiver batches arrivals: the real console script, exit 0.
    ids = held_out_ids(f"pair-{unique}")
    put(fhir_client, *held_out(f"pair-{unique}"))
    done = subprocess.run(
        [
            *CLI,
            "run",
            "--fhir-url",
            fhir_base_url,
            "--patients",
            f"{ids[BAD]},{ids[1]}",
            "--out",
            str(tmp_path / "pair"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 patients touched; Flags created 2" in done.stdout and "2 resources quarantined" in done.stdout
    pair = flags_by_place(fhir_client, ids)

    expected = batchings["one run"]
    assert all(len(flags) == 1 for flags in expected.values())  # one Flag each, the bad patient's too
    for name, flags in batchings.items():
        assert flags == expected, name
    assert (pair[BAD], pair[1]) == (expected[BAD], expected[1])


def test_a_flag_whose_evidence_is_quarantined_is_left_as_it_is(fhir_base_url, fhir_client, unique, tmp_path):
    pid, other = f"held-{unique}", f"held-other-{unique}"
    put(
        fhir_client,
        patient(pid),
        patient(other),
        observation(f"{pid}-low", "wbc", 2.0, time=recent(), patient=f"Patient/{pid}"),
        observation(f"{other}-low", "wbc", 2.0, time=recent(), patient=f"Patient/{other}"),
    )
    assert run(fhir_base_url, tmp_path / "first", pid, other) == 0
    (flag,) = project_flags(fhir_client, [pid])
    assert flag["status"] == "active"
    # The laboratory re-sends the result in a unit nobody knows: without it the rules would withdraw the Flag. It
    # stays as it is until the data is mended, while the other patient's Flag is judged as ever (here: closed by a
    # recovery).
    put(
        fhir_client,
        observation(f"{pid}-low", "wbc", 2.0, unit="furlong", time=recent(), patient=f"Patient/{pid}"),
        observation(f"{other}-ok", "wbc", 6.0, time=recent(days=1), patient=f"Patient/{other}"),
    )
    assert run(fhir_base_url, tmp_path / "second", pid, other) == 0
    report = json.loads((tmp_path / "second" / "report.json").read_text())
    assert report["flags_held"] == 1 and report["writes"]["withdraw"] == 0 and report["writes"]["update"] == 1
    (kept,) = project_flags(fhir_client, [pid])
    assert (kept["status"], kept["meta"]["versionId"]) == ("active", flag["meta"]["versionId"])
    assert [f["status"] for f in project_flags(fhir_client, [other])] == ["inactive"]
    # Mended: the Flag is judged again on the patient's data.
    put(fhir_client, observation(f"{pid}-low", "wbc", 6.5, time=recent(), patient=f"Patient/{pid}"))
    assert run(fhir_base_url, tmp_path / "mended", pid) == 0
    assert [f["status"] for f in project_flags(fhir_client, [pid])] == ["entered-in-error"]


def test_a_broken_feed_stops_the_whole_run_before_any_batch_writes(fhir_base_url, fhir_client, unique, tmp_path):
    with broken_feed_on(fhir_client, f"feed-{unique}") as (good, bad):
        # Batches of 4 patients: the good patients' batch comes first, and no batch alone has 50 failing rows.
        done = subprocess.run(
            [
                *CLI,
                "run",
                "--fhir-url",
                fhir_base_url,
                "--patients",
                ",".join(good + bad),
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "feed"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 6, done.stderr[-2000:]
        assert "the data failed its contract, nothing written" in done.stderr
        assert (
            "observations feed wbc in 'K/uL-new': 60 of 60 rows (100.0%) from 12 patients fail validation: "
            "expect_column_values_to_be_in_set(unit) 60 rows, expect_column_values_to_not_be_null(value) 60 rows, "
            "e.g. Observation/" in done.stderr
        )
        assert project_flags(fhir_client, good + bad) == []
        report = json.loads((tmp_path / "feed" / "report.json").read_text())
        assert report["contract_verdict"]["passed"] is False and report["chunks"] == 4
        assert report["chunks_written"] == 0
        assert sum(report["quarantined"].values()) == 60 and report["flags"]["total"] == 4  # wanted, never written
    # The feed mended (the unit known), the same run writes every patient's Flags.
    assert run(fhir_base_url, tmp_path / "mended", *good, *bad, batch_size=4) == 0
    assert len(project_flags(fhir_client, good + bad)) == 16

    # Below the minimum (4 patients, 20 rows: a few patients' problem, not a feed's), the run goes on.
    with broken_feed_on(fhir_client, f"few-{unique}", bad_patients=4) as (good, bad):
        assert run(fhir_base_url, tmp_path / "few", *good, *bad) == 0
        assert len(project_flags(fhir_client, good)) == 4 and project_flags(fhir_client, bad) == []
