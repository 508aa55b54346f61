"""The DAGs with dag.test() against the real HAPI server: Flags converge per patient, whatever the windows.

Each test makes its own patients (unique ids) and reads back only their Flags; the windows are real `_lastUpdated`
windows in the server's clock, or clinical-date windows, as the DAGs' users would give them."""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import EXTERNAL, ROOT

from leukofhir.evaluate.pipeline import evaluate_files
from leukofhir.write.load import load_files
from support.contract_data import BAD, broken_feed_on, flags_by_place, held_out, held_out_ids
from support.fhir_builders import at, days_ago, observation, patient, statement
from support.server_data import (
    RULES,
    flags_by_identifier,
    pause,
    project_flags,
    put,
    server_now,
    versions,
    without_patient,
)

pytestmark = [pytest.mark.fhir, pytest.mark.dag_run]

SYNTHEA_BUNDLES = sorted((EXTERNAL / "smart-generated-sample-data-R4-synthea" / "bundles").glob("*.json.gz"))
NOTHING_WRITTEN = {"create": 0, "update": 0, "withdraw": 0, "delete": 0, "refused": 0}


def _parse():
    from airflow.dag_processing.dagbag import DagBag

    # The DAG files import their DAGs from the package: forget its modules so that the DAGs are built afresh, as in
    # Airflow's own parsing processes (and in a new `airflow dags test`), not reused with an earlier run's Params.
    for name in [m for m in sys.modules if m.startswith("leukofhir.airflow.dags.")]:
        del sys.modules[name]
    bag = DagBag(str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags


@pytest.fixture(scope="module")
def dags(airflow_db, fhir_connection):
    dags = _parse()
    assert {"leukopenia_surveillance", "leukopenia_backfill", "leukopenia_patients"} <= set(dags)
    return dags


def run_dag(dags, dag_id: str, **conf) -> dict:
    """One dag.test() run, of freshly parsed DAGs (in one process, a run's Params otherwise leak into the next, as
    they never would between scheduled runs); its report.json, read from the run folder the tasks wrote."""
    return run_dag_folder(dags, dag_id, **conf)[0]


def run_dag_folder(dags, dag_id: str, **conf) -> tuple[dict, Path]:
    """run_dag, and the run folder."""
    run = _parse()[dag_id].test(run_conf=conf)
    assert run.state == "success", f"{dag_id} run {run.run_id} ended {run.state}"
    folder = _folder(dag_id, run.run_id)
    return json.loads((folder / "report.json").read_text(encoding="utf-8")), folder


def _folder(dag_id: str, run_id: str) -> Path:
    return Path(os.environ["AIRFLOW_HOME"]) / "leukofhir-runs" / dag_id / re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)


def run_dag_failing(dag_id: str, **conf) -> tuple[Path, dict[str, list[tuple[str, int]]]]:
    """One dag.test() run that must fail: its run folder, and each task's (state, tries) by map index."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    run = _parse()[dag_id].test(run_conf=conf)
    assert run.state == "failed", f"{dag_id} run {run.run_id} ended {run.state}"
    with create_session() as session:
        rows = (
            session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id).all()
        )
        tasks: dict[str, list[tuple[str, int]]] = {}
        for ti in sorted(rows, key=lambda ti: ti.map_index):
            tasks.setdefault(ti.task_id, []).append((str(ti.state), ti.try_number))
    return _folder(dag_id, run.run_id), tasks


def surveillance(dags, since, until) -> dict:
    """The surveillance DAG over one `_lastUpdated` window (a manual run gives it as Params)."""
    return run_dag(dags, "leukopenia_surveillance", start=since.isoformat(), end=until.isoformat())


def writes(report: dict) -> dict:
    return {k: report["writes"][k] for k in NOTHING_WRITTEN}


def standing(flags: list[dict]) -> set:
    """The Flags a chart shows (active or inactive), by clinical content."""
    return {without_patient(f) for f in flags if f["status"] != "entered-in-error"}


def test_backfill_dag_on_the_sample_data_writes_the_flags_of_the_rules_and_a_rerun_writes_nothing(
    dags, fhir_client, tmp_path
):
    assert load_files(fhir_client, SYNTHEA_BUNDLES, batch_size=250).ok
    ids = sorted(json.load(gzip.open(p, "rt"))["entry"][0]["resource"]["id"] for p in SYNTHEA_BUNDLES)
    until = server_now(fhir_client) + timedelta(days=1)
    report = run_dag(dags, "leukopenia_backfill", start="1900-01-01", end=until.date().isoformat(), chunks=3)
    assert report["reconciled"] and report["patients_touched"] >= len(ids)
    # The run evaluates as of its own time (clinical-rules v1.3 §4): offline `evaluate --as-of` that time gives its
    # Flags.
    offline = evaluate_files(SYNTHEA_BUNDLES, tmp_path, as_of=report["as_of"], progress=False)
    expected = flags_by_identifier([json.loads(line) for line in (tmp_path / "Flag.ndjson").open()])
    assert offline["flags"]["total"] == len(expected) > 0 and offline["as_of"] == report["as_of"]
    on_server = project_flags(fhir_client, ids)
    assert flags_by_identifier(on_server) == expected
    # The sample's counts end in 2020: as of the run every episode still open then has lapsed, none says "active".
    assert {f["status"] for f in on_server} == {"inactive"}
    assert sum(f["code"]["text"].endswith("no follow-up count for more than 90 days") for f in on_server) == 2

    again = run_dag(dags, "leukopenia_backfill", start="1900-01-01", end=until.date().isoformat(), chunks=2)
    assert writes(again) == NOTHING_WRITTEN
    assert again["writes"]["unchanged"] >= len(expected)
    assert versions(project_flags(fhir_client, ids)) == versions(on_server)


def test_backfill_dag_dry_run_writes_nothing_and_reports_what_it_would(dags, fhir_client, unique):
    pid = f"dry-{unique}"
    put(fhir_client, patient(pid), observation(f"{pid}-w1", "wbc", 1.5, time=at(), patient=f"Patient/{pid}"))
    report = run_dag(dags, "leukopenia_backfill", patients=[pid], dry_run=True)
    assert report["dry_run"] is True and report["patients_touched"] == 1
    assert report["writes"]["create"] == 1
    assert project_flags(fhir_client, [pid]) == []
    report = run_dag(dags, "leukopenia_backfill", patients=[pid])
    assert report["writes"]["create"] == 1 and len(project_flags(fhir_client, [pid])) == 1


def test_patients_dag_evaluates_exactly_the_patients_named_and_a_rerun_writes_nothing(dags, fhir_client, unique):
    named, bare, other = (f"{kind}-{unique}" for kind in ("named", "bare", "other"))
    put(
        fhir_client,
        *(patient(p) for p in (named, bare, other)),
        *(observation(f"{p}-w", "wbc", 1.7, time=at(), patient=f"Patient/{p}") for p in (named, bare, other)),
    )
    # As the receiver sends them (Patient/<id>), or bare ids as a person would type them.
    report = run_dag(dags, "leukopenia_patients", patients=[f"Patient/{named}", bare])
    assert report["patients_touched"] == 2 and report["writes"]["create"] == 2 and report["reconciled"]
    assert set(report["seconds"]) == {"find", "extract", "evaluate", "write", "total"}  # one process ran every step
    assert [len(project_flags(fhir_client, [p])) for p in (named, bare, other)] == [1, 1, 0]
    on_server = project_flags(fhir_client, [named, bare])

    again = run_dag(dags, "leukopenia_patients", patients=[bare, f"Patient/{named}"])
    assert writes(again) == NOTHING_WRITTEN and again["writes"]["unchanged"] == 2
    assert versions(project_flags(fhir_client, [named, bare])) == versions(on_server)


# Runs evaluate as of their own time (clinical-rules v1.3 §4): histories that must still be current end recently, all
# patients of one test on the same instants (compared by clinical content).
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def _ago(days: float) -> str:
    return days_ago(days, now=NOW)


def _history(pid: str, part: int) -> list[dict]:
    """Two deliveries of one patient's results: first a low WBC; then a lower one, a recovery and a later low (20 days
    ago: still followed, so its episode is active as of the runs)."""
    ref = f"Patient/{pid}"
    if part == 1:
        return [observation(f"{pid}-a", "wbc", 3.1, time=_ago(60), patient=ref)]
    return [
        observation(f"{pid}-b", "wbc", 1.8, time=_ago(58), patient=ref),
        observation(f"{pid}-c", "wbc", 6.5, time=_ago(51), patient=ref),
        observation(f"{pid}-d", "wbc", 2.6, time=_ago(20), patient=ref),
    ]


def test_surveillance_windows_in_any_order_give_the_same_flags(dags, fhir_client, unique):
    a, b = f"ord-a-{unique}", f"ord-b-{unique}"
    put(fhir_client, patient(a), patient(b))
    marks = [server_now(fhir_client)]
    for pid, part in ((a, 1), (a, 2), (b, 1), (b, 2)):
        pause()
        put(fhir_client, *_history(pid, part))
        pause()
        marks.append(server_now(fhir_client))
    # Patient a: its two windows in order; patient b: its two windows in reverse order.
    surveillance(dags, marks[0], marks[1])
    surveillance(dags, marks[1], marks[2])
    surveillance(dags, marks[3], marks[4])
    surveillance(dags, marks[2], marks[3])
    flags_a, flags_b = project_flags(fhir_client, [a]), project_flags(fhir_client, [b])
    assert standing(flags_a) == standing(flags_b) and len(standing(flags_a)) == 2
    assert {f["status"] for f in flags_a} == {"inactive", "active"}
    # Every window again, in reverse: nothing to write.
    for since, until in reversed(list(zip(marks, marks[1:]))):
        assert writes(surveillance(dags, since, until)) == NOTHING_WRITTEN


def test_a_recovery_in_a_later_window_closes_the_flag_an_earlier_window_opened(dags, fhir_client, unique):
    pid = f"rec-{unique}"
    put(fhir_client, patient(pid))
    t0 = server_now(fhir_client)
    put(fhir_client, observation(f"{pid}-low", "anc", 0.8, time=days_ago(10), patient=f"Patient/{pid}"))
    pause()
    t1 = server_now(fhir_client)
    surveillance(dags, t0, t1)
    (opened,) = project_flags(fhir_client, [pid])
    assert opened["status"] == "active" and "end" not in opened["period"]
    assert opened["code"]["coding"][0]["code"] == "165517008"  # neutropenia

    recovered = days_ago(7)
    put(fhir_client, observation(f"{pid}-ok", "anc", 2.4, time=recovered, patient=f"Patient/{pid}"))
    pause()
    t2 = server_now(fhir_client)
    surveillance(dags, t1, t2)
    (closed,) = project_flags(fhir_client, [pid])
    assert closed["id"] == opened["id"] and closed["identifier"] == opened["identifier"]
    assert closed["status"] == "inactive" and closed["period"]["end"] == recovered
    assert "normal again" in closed["code"]["text"]


def test_amended_deleted_and_retracted_results_withdraw_their_flags(dags, fhir_client, unique):
    amended, deleted, retracted = (f"{kind}-{unique}" for kind in ("amd", "del", "eie"))
    low = {
        pid: observation(f"{pid}-low", "wbc", 1.2, time=days_ago(5), patient=f"Patient/{pid}")
        for pid in (amended, deleted, retracted)
    }
    put(fhir_client, *(patient(p) for p in low))
    t0 = server_now(fhir_client)
    put(fhir_client, *low.values())
    pause()
    t1 = server_now(fhir_client)
    surveillance(dags, t0, t1)
    before = {pid: project_flags(fhir_client, [pid]) for pid in low}
    assert all(len(flags) == 1 and flags[0]["status"] == "active" for flags in before.values())

    put(
        fhir_client,
        {**low[amended], "status": "amended", "valueQuantity": {**low[amended]["valueQuantity"], "value": 6.1}},
    )
    put(fhir_client, {**low[retracted], "status": "entered-in-error"})
    fhir_client.request("DELETE", f"Observation/{deleted}-low")
    pause()
    report = surveillance(dags, t1, server_now(fhir_client))
    assert report["writes"]["withdraw"] + report["writes"]["update"] >= 3
    for pid in low:
        (flag,) = project_flags(fhir_client, [pid])
        assert flag["id"] == before[pid][0]["id"]
        assert flag["status"] == "entered-in-error", pid


def _ten_years(pid: str) -> list[list[dict]]:
    """A patient's ten years of counts and a chemotherapy course, in five two-year deliveries: episodes that
    recover, one closed by the episode gap, one drug-associated, one still open at the end (its last count 50 days
    ago)."""
    ref = f"Patient/{pid}"
    values = [
        (0, 6.2),
        (30, 3.4),
        (33, 5.5),
        (400, 2.9),
        (700, 1.4),
        (705, 0.8),
        (720, 4.6),
        (1100, 3.7),
        (1500, 7.0),
        (1800, 2.2),
        (2200, 3.9),
        (2600, 6.1),
        (2900, 0.9),
        (3300, 1.9),
        (3600, 2.5),
    ]
    deliveries: list[list[dict]] = [[] for _ in range(5)]
    for n, (day, wbc) in enumerate(values):
        deliveries[min(day // 730, 4)].append(
            observation(f"{pid}-w{n}", "wbc", wbc, time=_ago(3650 - day), patient=ref)
        )
    deliveries[3].append(
        statement(
            f"{pid}-chemo",
            "Oxaliplatin 100 MG Injection",
            start=_ago(3650 - 2850),
            end=_ago(3650 - 2880),
            patient_ref=ref,
        )
    )
    return deliveries


def test_a_ten_year_backfill_and_ten_years_of_incremental_runs_give_the_same_flags(dags, fhir_client, unique):
    once, stepwise = f"ten-once-{unique}", f"ten-step-{unique}"
    put(fhir_client, patient(once), patient(stepwise))
    put(fhir_client, *[r for delivery in _ten_years(once) for r in delivery])
    run_dag(dags, "leukopenia_backfill", patients=[once])

    for delivery in _ten_years(stepwise):
        since = server_now(fhir_client)
        put(fhir_client, *delivery)
        pause()
        surveillance(dags, since, server_now(fhir_client))
    flags_once, flags_step = project_flags(fhir_client, [once]), project_flags(fhir_client, [stepwise])
    assert standing(flags_once) == standing(flags_step)
    assert len(standing(flags_once)) >= 4
    assert sum(f[0] == "active" for f in standing(flags_once)) == 1  # the one still open at the end
    assert any(
        "possibly drug-associated: antineoplastic chemotherapy (oxaliplatin)" in f[2] for f in standing(flags_once)
    )


def _desired_flags(run_folder: Path) -> dict[str, dict]:
    """The Flags a run wanted (every chunk's evaluated batches), as compared for writes, by identifier."""
    return flags_by_identifier(
        [
            json.loads(line)
            for path in sorted(run_folder.glob("chunks/*/evaluated/*/Flag.ndjson"))
            for line in path.read_text().splitlines()
        ]
    )


def _crossing_patients(unique: str) -> list[dict]:
    """Patients whose Flags need more than their Observations: a panel timing its untimed members, a chemotherapy
    order naming its drug only in a referenced Medication, a project Flag no longer supported (withdrawn)."""
    panel, chemo, stale = (f"{kind}-{unique}" for kind in ("pnl", "chm", "stl"))
    members = [
        observation(f"{panel}-w{n}", "wbc", value, time=False, patient=f"Patient/{panel}")
        for n, value in enumerate((1.6, 6.2))
    ]
    panel_obs = {
        "resourceType": "Observation",
        "id": f"{panel}-cbc",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
        "subject": {"reference": f"Patient/{panel}"},
        "effectiveDateTime": at(days=-30),
        "hasMember": [{"reference": f"Observation/{m['id']}"} for m in members[:1]],
    }
    later = {
        **panel_obs,
        "id": f"{panel}-cbc2",
        "effectiveDateTime": at(days=-20),
        "hasMember": [{"reference": f"Observation/{members[1]['id']}"}],
    }
    medication = {"resourceType": "Medication", "id": f"{chemo}-med", "code": {"text": "Cisplatin 50 MG Injection"}}
    order = {
        "resourceType": "MedicationRequest",
        "id": f"{chemo}-mr",
        "status": "active",
        "intent": "order",
        "subject": {"reference": f"Patient/{chemo}"},
        "authoredOn": at(days=-12),
        "medicationReference": {"reference": f"Medication/{chemo}-med"},
    }
    stale_flag = {
        "resourceType": "Flag",
        "id": f"leukofhir-{unique}0000000000000000000000000000",
        "meta": {"tag": [{"system": RULES.uris.tag_system, "code": RULES.uris.tag_code}]},
        "identifier": [{"system": RULES.uris.identifier_system, "value": f"{unique}0000000000000000000000000000"}],
        "status": "active",
        "code": {"text": "Leukopenia"},
        "subject": {"reference": f"Patient/{stale}"},
        "period": {"start": at(days=-5)},
    }
    dated = observation(f"{panel}-hb", "hemoglobin", 13.5, time=at(days=-40), patient=f"Patient/{panel}")  # touched
    return [
        patient(panel),
        patient(chemo),
        patient(stale),
        *members,
        dated,
        panel_obs,
        later,
        medication,
        order,
        observation(f"{chemo}-w", "wbc", 1.9, time=at(days=-10), patient=f"Patient/{chemo}"),
        observation(f"{stale}-w", "wbc", 5.9, time=at(days=-5), patient=f"Patient/{stale}"),
        stale_flag,
    ]


def test_backfill_by_export_gives_the_flags_of_the_backfill_by_search(dags, fhir_client, unique):
    """Param extract: the same window by searches and by $export (both dry runs, then for real: the second writes
    nothing), on the sample data and on patients whose Flags need their panels, Medications and project Flags."""
    assert load_files(fhir_client, SYNTHEA_BUNDLES, batch_size=250).ok
    put(fhir_client, *_crossing_patients(unique))
    window = {
        "start": "1900-01-01",
        "end": (server_now(fhir_client) + timedelta(days=1)).date().isoformat(),
        "chunks": 3,
    }
    by_search, search_folder = run_dag_folder(dags, "leukopenia_backfill", extract="search", dry_run=True, **window)
    by_export, export_folder = run_dag_folder(dags, "leukopenia_backfill", extract="export", dry_run=True, **window)
    assert (by_search["extract"], by_export["extract"]) == ("search", "export")
    assert by_export["patients_touched"] == by_search["patients_touched"] > 5
    flags = _desired_flags(export_folder)
    assert flags == _desired_flags(search_folder) and len(flags) > 5
    assert writes(by_export) == writes(by_search) and by_export["writes"]["withdraw"] >= 1
    texts = [f["code"]["text"] for f in flags.values()]
    assert any("possibly drug-associated: antineoplastic chemotherapy (cisplatin)" in t for t in texts)
    assert any(f["subject"]["reference"] == f"Patient/pnl-{unique}" for f in flags.values())
    assert not (export_folder / "export").exists()  # staged in the chunks, then removed

    written = run_dag(dags, "leukopenia_backfill", extract="search", **window)
    assert written["writes"]["create"] >= 1 and written["writes"]["withdraw"] >= 1
    again = run_dag(dags, "leukopenia_backfill", extract="export", **window)
    assert writes(again) == NOTHING_WRITTEN and again["writes"]["unchanged"] >= len(flags)


def test_extract_auto_exports_a_long_window_and_searches_a_short_one_or_a_list(dags, fhir_client, unique):
    pid = f"auto-{unique}"
    put(fhir_client, patient(pid), observation(f"{pid}-w", "wbc", 1.5, time=at(), patient=f"Patient/{pid}"))
    long = run_dag(dags, "leukopenia_backfill", extract="auto", start="2023-01-01", end="2025-01-01", dry_run=True)
    short = run_dag(dags, "leukopenia_backfill", extract="auto", start="2024-02-15", end="2024-03-15", dry_run=True)
    listed = run_dag(dags, "leukopenia_backfill", extract="export", patients=[pid], dry_run=True)
    assert (long["extract"], short["extract"], listed["extract"]) == ("export", "search", "search")
    assert long["patients_touched"] >= short["patients_touched"] >= 1 and long["writes"]["create"] >= 1


def test_one_patients_broken_results_never_block_the_others_whatever_the_chunks(dags, fhir_client, unique, tmp_path):
    """The held-out population (issue 17): one run, the backfill DAG in four chunks, and the near-real-time DAG with
    the bad patient and a good one give the same Flags; the bad patient's broken results are quarantined."""
    from leukofhir.fhir.client import FhirClient
    from leukofhir.run import run_pipeline

    one = held_out_ids(f"one-{unique}")
    put(fhir_client, *held_out(f"one-{unique}"))
    with FhirClient(fhir_client.base_url) as client:
        run_pipeline(client, RULES, tmp_path / "one", patients=one)
    expected = flags_by_place(fhir_client, one)
    assert all(len(flags) == 1 for flags in expected.values())

    chunked = held_out_ids(f"chunks-{unique}")
    put(fhir_client, *held_out(f"chunks-{unique}"))
    report, folder = run_dag_folder(dags, "leukopenia_backfill", patients=chunked, chunks=4)
    assert report["chunks"] == report["chunks_written"] == 4 and report["contract_verdict"]["passed"] is True
    assert flags_by_place(fhir_client, chunked) == expected
    quarantined = [json.loads(line) for line in (folder / "quarantine.ndjson").read_text().splitlines()]
    assert sorted(q["resource"]["id"] for q in quarantined) == [f"{chunked[BAD]}-text", f"{chunked[BAD]}-unit"]

    pair = held_out_ids(f"pair-{unique}")
    put(fhir_client, *held_out(f"pair-{unique}"))
    report = run_dag(dags, "leukopenia_patients", patients=[pair[BAD], pair[0]])
    assert report["writes"]["create"] == 2 and sum(report["quarantined"].values()) == 2
    got = flags_by_place(fhir_client, pair)
    assert (got[BAD], got[0]) == (expected[BAD], expected[0])


def test_a_broken_feed_fails_the_backfill_before_any_chunk_writes(dags, fhir_client, unique):
    with broken_feed_on(fhir_client, f"feed-{unique}") as (good, bad):
        folder, tasks = run_dag_failing("leukopenia_backfill", patients=good + bad, chunks=4)
    # Every chunk evaluated; the barrier failed once, without retries (the data is the same on every try)...
    assert [state for state, _ in tasks["evaluate"]] == ["success"] * 4
    assert tasks["check_contract"] == [("failed", 1)]
    # ...and no chunk wrote: not even the first, which holds the good patients alone.
    assert {state for state, _ in tasks.get("write_flags", [])} <= {"upstream_failed"}
    assert not list(folder.glob("chunks/*/writes.json"))
    assert project_flags(fhir_client, good + bad) == []
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert report["contract_verdict"]["passed"] is False and report["chunks_written"] == 0
    assert (
        "observations feed wbc in 'K/uL-new': 60 of 60 rows (100.0%) from 12 patients"
        in report["contract_verdict"]["message"]
    )
    assert tasks["report"] == [("failed", 1)]  # the run says why, once


def scheduled_surveillance(logical_date: datetime) -> tuple[dict, list[str]]:
    """A scheduled run of the surveillance DAG (its window: the data interval Airflow gives `logical_date`): its
    report.json, and the patients it read."""
    from leukofhir.extract.run_folder import chunk_dirs
    from leukofhir.extract.search import read_patient_list

    run = _parse()["leukopenia_surveillance"].test(logical_date=logical_date)
    assert run.state == "success", f"run {run.run_id} ended {run.state}"
    folder = _folder("leukopenia_surveillance", run.run_id)
    read = [p for chunk in chunk_dirs(folder) for p in read_patient_list(chunk / "patients.json")]
    return json.loads((folder / "report.json").read_text(encoding="utf-8")), read


def _board_numbers() -> dict:
    html = (Path(os.environ["AIRFLOW_HOME"]) / "leukofhir-runs" / "board" / "board.html").read_text(encoding="utf-8")
    return {
        key: int(re.search(rf'id="{key}">([\d,]+)<', html).group(1).replace(",", ""))
        for key in ("count-total", "count-active", "count-inactive")
    }


def test_the_surveillance_run_whose_interval_holds_midnight_utc_sweeps_lapsed_flags(
    dags, fhir_client, unique, tmp_path, monkeypatch, own_tag
):
    from leukofhir.config import load_config
    from leukofhir.run import run_pipeline

    # The project's Flags of this test only: their own tag, in the site rules file the tasks read.
    config, put_on_server = own_tag
    monkeypatch.setenv("LEUKOFHIR_RULES", str(config))
    monkeypatch.delenv("LEUKOFHIR_LAPSE_SWEEP_HOUR", raising=False)
    rules = load_config(config)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    pid = f"lapse-{unique}"
    put_on_server.append(pid)
    count_time = days_ago(91, now=now)
    put(fhir_client, patient(pid), observation(f"{pid}-w", "wbc", 2.1, time=count_time, patient=f"Patient/{pid}"))
    # Written three days ago, when its count was 88 days old: active. Its data has not changed since.
    run_pipeline(fhir_client, rules, tmp_path / "before", patients=[pid], now=now - timedelta(days=3))
    (flag,) = project_flags(fhir_client, [pid], rules)
    assert flag["status"] == "active"

    # Hourly intervals of a day to come, so that no window touches anyone (deletions are listed from a window's start
    # on); the sweep's as-of is still the run's start, now.
    day = datetime.combine((now + timedelta(days=30)).date(), datetime.min.time(), tzinfo=timezone.utc)
    # Logical dates 00:30 and 13:30: the intervals [23:00, 00:00) (it ends at midnight, the next one holds it) and
    # [12:00, 13:00).
    for logical in (day + timedelta(minutes=30), day + timedelta(hours=13, minutes=30)):
        report, read = scheduled_surveillance(logical)
        assert report["sweep"] is None and pid not in read
        assert project_flags(fhir_client, [pid], rules) == [flag]
    # Every run refreshes the board from the project's Flags on the server (this test's tag: its one Flag).
    assert _board_numbers() == {"count-total": 1, "count-active": 1, "count-inactive": 0}
    report, read = scheduled_surveillance(day + timedelta(hours=1, minutes=30))  # [00:00, 01:00): the day's sweep
    assert report["sweep"] == {"candidates": 1, "flags_read": 1, "added": 1} and read == [pid]
    assert report["writes"]["update"] == 1
    (closed,) = project_flags(fhir_client, [pid], rules)
    assert closed["id"] == flag["id"] and closed["status"] == "inactive"
    assert closed["period"] == {"start": count_time, "end": count_time}
    assert closed["code"]["text"].endswith("; no follow-up count for more than 90 days")
    assert _board_numbers() == {"count-total": 1, "count-active": 0, "count-inactive": 1}

    # The hour is the site's, read when the run starts: at 13:00 the run of 13:00-14:00 sweeps (nothing left to close).
    monkeypatch.setenv("LEUKOFHIR_LAPSE_SWEEP_HOUR", "13")
    report, read = scheduled_surveillance(day + timedelta(hours=14, minutes=30))
    assert report["sweep"] == {"candidates": 0, "flags_read": 0, "added": 0} and read == []
    assert writes(report) == NOTHING_WRITTEN and project_flags(fhir_client, [pid], rules) == [closed]
