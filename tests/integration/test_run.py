"""`leukofhir run` and its write step against the real server: refusals isolated, concurrent runs, long queries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from leukofhir.config import load_config
from leukofhir.evaluate.pipeline import evaluate_files
from leukofhir.fhir.client import FhirClient
from leukofhir.run import run_pipeline
from leukofhir.write.flags import Change, apply_plan, ensure_author, flag_id
from support.faultproxy import FaultProxy
from support.fhir_builders import at, days_ago, observation, patient
from support.server_data import flags_by_identifier, project_flags, put

pytestmark = pytest.mark.fhir

RULES = load_config()
CLI = [sys.executable, "-m", "leukofhir.cli"]


def _flag(pid: str, value: str) -> dict:
    return {
        "resourceType": "Flag",
        "meta": {"tag": [{"system": RULES.uris.tag_system, "code": RULES.uris.tag_code}]},
        "identifier": [{"system": RULES.uris.identifier_system, "value": value}],
        "status": "active",
        "code": {"text": "test"},
        "subject": {"reference": f"Patient/{pid}"},
        "author": {"reference": RULES.uris.author},
    }


def test_a_refused_write_is_isolated_and_reported_and_the_rest_is_written(fhir_client, unique):
    pids = [f"w{n}-{unique}" for n in range(5)]
    put(fhir_client, *(patient(p) for p in pids))
    ensure_author(fhir_client, RULES)
    good = [
        Change("create", f"ok{n}-{unique}", _flag(p, f"ok{n}-{unique}"), flag_id(f"ok{n}-{unique}"))
        for n, p in enumerate(pids)
    ]
    # Referential integrity: a Flag about a Patient the server does not have is refused, and the whole transaction
    # with it; the writer must find it and still write the five others.
    bad = Change("create", f"bad-{unique}", _flag(f"nobody-{unique}", f"bad-{unique}"), flag_id(f"bad-{unique}"))
    result = apply_plan(fhir_client, good[:2] + [bad] + good[2:])
    assert result.written["create"] == 5
    (refused,) = result.refused
    assert refused["identifier"] == f"bad-{unique}" and refused["status"] in (400, 404, 409, 412, 422)
    assert f"nobody-{unique}" in json.dumps(refused["outcome"])  # the server's own words, for the rejects file
    flags = project_flags(fhir_client, pids)
    assert set(flags_by_identifier(flags)) == {c.identifier for c in good}
    assert {f["id"] for f in flags} == {c.flag_id for c in good}  # at the ids derived from their identifiers


def test_two_runs_at_once_on_the_same_patients_leave_one_flag_per_identifier(
    fhir_base_url, fhir_client, unique, tmp_path
):
    pids = [f"race{n}-{unique}" for n in range(30)]
    put(
        fhir_client,
        *(patient(p) for p in pids),
        *(observation(f"{p}-w", "wbc", 1.1 + n / 100, time=at(), patient=f"Patient/{p}") for n, p in enumerate(pids)),
    )
    runs = [
        subprocess.Popen(
            [
                *CLI,
                "run",
                "--fhir-url",
                fhir_base_url,
                "--patients",
                ",".join(pids),
                "--batch-size",
                "10",
                "--out",
                str(tmp_path / f"run{n}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    flags = project_flags(fhir_client, pids)
    assert len(flags) == len(pids) and len(flags_by_identifier(flags)) == len(pids)
    reports = [json.loads((tmp_path / f"run{n}" / "report.json").read_text()) for n in range(2)]
    # Between them the two runs wrote each Flag (a run that lost a race found the Flag there and left it).
    assert all(r["writes"]["refused"] == 0 for r in reports)


def test_run_reads_long_patient_lists_with_post_search_and_a_rerun_writes_nothing(
    fhir_base_url, fhir_client, unique, tmp_path
):
    # 60 patients with 64-character ids: one batch's query is far above what a URL should carry.
    pids = [f"{n:02d}-{unique}".ljust(64, "x") for n in range(60)]
    put(
        fhir_client,
        *(patient(p) for p in pids),
        *(observation(f"{p[:50]}-a", "anc", 0.4, time=at(), patient=f"Patient/{p}") for p in pids[:3]),
    )
    with FaultProxy(fhir_base_url) as proxy:
        with FhirClient(proxy.base_url, backoff=0.01) as client:
            report = run_pipeline(client, RULES, tmp_path / "one", patients=pids, batch_size=60)
        assert report["patients_touched"] == 60 and report["writes"]["create"] == 3
        assert any(method == "POST" and path.endswith("/Observation/_search") for method, path, _ in proxy.requests)
        assert all(len(path) < 4096 for _, path, _ in proxy.requests)
    flags = project_flags(fhir_client, pids[:3])
    assert {f["code"]["coding"][0]["code"] for f in flags} == {"17182001"}  # agranulocytosis
    with FhirClient(fhir_base_url) as client:
        again = run_pipeline(client, RULES, tmp_path / "two", patients=pids, batch_size=60)
    assert again["writes"]["create"] == again["writes"]["update"] == again["writes"]["withdraw"] == 0
    assert again["writes"]["unchanged"] == 3


def test_run_command_summary_outputs_and_exit_codes(fhir_base_url, fhir_client, unique, tmp_path):
    pid = f"cli-{unique}"
    put(fhir_client, patient(pid), observation(f"{pid}-w", "wbc", 2.5, time=at(), patient=f"Patient/{pid}"))
    out = tmp_path / "dry"
    done = subprocess.run(
        [*CLI, "run", "--fhir-url", fhir_base_url, "--patients", pid, "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 patients touched; Flags would be created 1" in done.stdout
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.html", "quarantine.ndjson", "rejects.ndjson"}
    assert project_flags(fhir_client, [pid]) == []

    usage = subprocess.run(
        [*CLI, "run", "--fhir-url", fhir_base_url, "--since", "2024-01-01"], capture_output=True, text=True, timeout=120
    )
    assert usage.returncode == 2 and "--until is required" in usage.stderr
    empty = subprocess.run(
        [*CLI, "run", "--fhir-url", fhir_base_url, "--since", "2024-02-01", "--until", "2024-01-01"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert empty.returncode == 2 and "window is empty" in empty.stderr
    down = subprocess.run(
        [
            *CLI,
            "run",
            "--fhir-url",
            "http://127.0.0.1:9/fhir",
            "--patients",
            pid,
            "--timeout",
            "2",
            "--out",
            str(tmp_path / "down"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert down.returncode == 4 and "cannot be used" in down.stderr and "Traceback" not in down.stderr

    # One patient whose every WBC is in a unit nobody knows: quarantined, no Flag, and the run goes on (exit 0). A
    # broken feed (many patients) is what stops a run with exit 6: tests/integration/test_contract_run.py.
    bad = f"contract-{unique}"
    put(
        fhir_client,
        patient(bad),
        observation(f"{bad}-w", "wbc", 2.5, time=at(), patient=f"Patient/{bad}", unit="furlong"),
    )
    contract = subprocess.run(
        [*CLI, "run", "--fhir-url", fhir_base_url, "--patients", bad, "--out", str(tmp_path / "contract")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert contract.returncode == 0 and "1 resources quarantined" in contract.stdout, contract.stderr[-2000:]
    assert project_flags(fhir_client, [bad]) == []


def test_eight_simultaneous_writes_of_one_new_flag_leave_one_flag(fhir_base_url, fhir_client, unique):
    import threading

    pid = f"same-{unique}"
    put(fhir_client, patient(pid))
    ensure_author(fhir_client, RULES)
    for attempt in range(3):
        value = f"race{attempt}-{unique}"
        change = Change("create", value, _flag(pid, value), flag_id(value))
        barrier, results = threading.Barrier(8), []

        def write():  # run by this iteration's threads, joined before the next iteration
            with FhirClient(fhir_base_url, backoff=0.01) as client:
                barrier.wait()  # noqa: B023
                results.append(apply_plan(client, [change]))  # noqa: B023

        threads = [threading.Thread(target=write) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert [r.refused for r in results] == [[]] * 8
        assert fhir_client.count("Flag", {"identifier": f"{RULES.uris.identifier_system}|{value}"}) == 1


def test_a_run_evaluates_as_of_its_own_time_so_an_episode_without_a_count_for_90_days_has_lapsed(
    fhir_base_url, fhir_client, unique, tmp_path
):
    """clinical-rules v1.3 §4: the patients' data alone does not say whether a Flag is current; the run's time does."""
    lapsed, followed = f"lapsed-{unique}", f"followed-{unique}"
    last = {lapsed: days_ago(91), followed: days_ago(89)}
    resources = [patient(lapsed), patient(followed)]
    resources += [
        observation(f"{pid}-w", "wbc", 2.2, time=time, patient=f"Patient/{pid}") for pid, time in last.items()
    ]
    put(fhir_client, *resources)
    with FhirClient(fhir_base_url) as client:
        report = run_pipeline(client, RULES, tmp_path / "run", patients=[lapsed, followed])
    flags = {f["subject"]["reference"]: f for f in project_flags(fhir_client, [lapsed, followed])}
    old, recent = flags[f"Patient/{lapsed}"], flags[f"Patient/{followed}"]
    assert (old["status"], old["period"]) == ("inactive", {"start": last[lapsed], "end": last[lapsed]})
    assert old["code"]["text"].endswith("; no follow-up count for more than 90 days")
    assert (recent["status"], recent["period"]) == ("active", {"start": last[followed]})
    # Offline, as of the run's time, the same Flags; as of the input's latest time (the default), both still open.
    source = tmp_path / "patients.ndjson"
    source.write_text("".join(json.dumps(r) + "\n" for r in resources))
    evaluate_files([source], tmp_path / "offline", as_of=report["as_of"], progress=False)
    offline = [json.loads(line) for line in (tmp_path / "offline" / "Flag.ndjson").open()]
    assert flags_by_identifier(offline) == flags_by_identifier(list(flags.values()))
    evaluate_files([source], tmp_path / "latest", progress=False)
    assert {json.loads(line)["status"] for line in (tmp_path / "latest" / "Flag.ndjson").open()} == {"active"}
