"""The backfill's extract by Bulk Data `$export` (leukofhir.extract.bulk) against the real HAPI server: the exports a
run asks for, and a process killed in the middle of them that resumes the same jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from leukofhir.config import load_config
from leukofhir.extract.bulk import history_export, run_exports, window_export
from leukofhir.extract.search import Window, observation_codes, window_searches
from leukofhir.fhir.bulk import STATE_FILE
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FhirError
from support.faultproxy import Fault, FaultProxy
from support.fhir_builders import at, observation, patient
from support.server_data import put

RULES = load_config()
POLL = r"export-poll-status"


def test_the_window_export_selects_with_the_searches_of_the_searching_path():
    for field in ("effective", "lastUpdated"):
        window = Window.parse("2020-01-01", "2021-01-01", field)
        request = window_export(RULES, window)
        filters = {}
        for value in request.type_filters:
            kind, _, query = value.partition("?")
            filters[kind] = {k: sorted(v) for k, v in parse_qs(query).items()}
        for kind, params in window_searches(window, RULES):
            wanted = {k: sorted(v if isinstance(v, list) else [v]) for k, v in params.items()}
            assert filters[kind] == wanted, kind
        assert set(request.types) == set(filters)
        assert ("Patient" in filters) == (field == "lastUpdated")
    history = history_export(RULES)
    assert f"Observation?code={observation_codes(RULES)}" in [unquote(f) for f in history.type_filters]
    assert {"Observation", "DiagnosticReport", "MedicationStatement", "Medication", "Patient", "Flag"} <= set(
        history.types
    )
    assert not any("date" in f or "_lastUpdated" in f for f in history.type_filters)  # whole histories


@pytest.mark.fhir
def test_a_process_killed_in_the_middle_of_the_exports_resumes_the_same_jobs(
    fhir_base_url, fhir_client, unique, tmp_path
):
    pid = f"bulk-{unique}"
    put(fhir_client, patient(pid), observation(f"{pid}-w", "wbc", 1.4, time=at(), patient=f"Patient/{pid}"))
    folder = tmp_path / "export"
    with FaultProxy(fhir_base_url) as proxy:
        # Every status poll answered 3 s late: time to kill the process while the second export runs.
        proxy.add(*[Fault("delay", seconds=3, method="GET", path_regex=POLL) for _ in range(30)])
        script = (
            "import sys\n"
            "from pathlib import Path\n"
            "from leukofhir.extract.bulk import run_exports\n"
            "from leukofhir.config import load_config\n"
            "from leukofhir.extract.search import Window\n"
            "from leukofhir.fhir.client import FhirClient\n"
            "with FhirClient(sys.argv[1]) as client:\n"
            "    run_exports(client, load_config(), Path(sys.argv[2]), Window.parse('2024-01-01', '2024-06-01', "
            "'effective'), max_wait=600)\n"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", script, proxy.base_url, str(folder)],
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        state = folder / "history" / STATE_FILE
        deadline = time.monotonic() + 300
        # Both jobs start at once (run_exports' default); each first poll is answered 3 s late, so both are running.
        while not (state.exists() and (folder / "window" / STATE_FILE).exists()):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the exports never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # a worker dying: no clean-up of any kind
        process.wait(30)
        process.stderr.close()
        started = json.loads(state.read_text())
        assert not started.get("complete") and started["status_url"]
        window_started = json.loads((folder / "window" / STATE_FILE).read_text())
        unfinished = {urlsplit(s["status_url"]).query for s in (started, window_started) if not s.get("complete")}
        before = len(proxy.requests)

        with FhirClient(proxy.base_url, backoff=0.01, sleep=lambda s: time.sleep(min(s, 0.5))) as client:
            counts = run_exports(client, RULES, folder, Window.parse("2024-01-01", "2024-06-01", "effective"))
        again = proxy.requests[before:]
    kick_offs = [p for m, p, _ in proxy.requests if m == "GET" and "/$export?" in p]
    assert len(kick_offs) == 2  # the window's and the histories', each once: the second run started nothing
    polled = {urlsplit(p).query for m, p, _ in again if m == "GET" and POLL in p}
    assert polled == unfinished  # only the jobs the killed process had started and not seen end
    assert counts["window"]["Observation"] >= 1 and counts["history"]["Patient"] >= 1
    finished = json.loads(state.read_text())
    assert finished["complete"] is True and finished["status_url"] == started["status_url"]
    exported = [
        json.loads(line)["id"]
        for f in (folder / "history").glob("Observation.*.ndjson")
        for line in f.read_text().splitlines()
    ]
    assert f"{pid}-w" in exported
    assert not list(Path(folder).rglob("*.part"))


@pytest.mark.fhir
def test_an_export_the_server_refuses_does_not_stop_the_other(fhir_base_url, fhir_client, unique, tmp_path):
    pid = f"bulk-refused-{unique}"
    put(fhir_client, patient(pid), observation(f"{pid}-w", "wbc", 1.4, time=at(), patient=f"Patient/{pid}"))
    folder = tmp_path / "export"
    window = Window.parse("2024-01-01", "2024-06-01", "effective")
    with FaultProxy(fhir_base_url) as proxy:
        # Only the window's kick-off names a date in its _typeFilter; the server refuses it every time.
        refusal = json.dumps({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]})
        proxy.add(
            *[Fault("status", status=400, body=refusal, method="GET", path_regex=r"\$export\?.*date") for _ in range(5)]
        )
        client = FhirClient(proxy.base_url, backoff=0.01, sleep=lambda s: time.sleep(min(s, 0.5)))
        with client, pytest.raises(FhirError):
            run_exports(client, RULES, folder, window)
    history = json.loads((folder / "history" / STATE_FILE).read_text())
    assert history["complete"] is True  # the other job ran to its end, kept for the retry
    exported = [
        json.loads(line)["id"]
        for f in (folder / "history").glob("Observation.*.ndjson")
        for line in f.read_text().splitlines()
    ]
    assert f"{pid}-w" in exported
