"""Crashes in the middle of writing: `leukofhir run` killed (kill -9) at its first and at its second transaction, and
the HAPI server killed while a transaction is on its way; then the next run leaves one Flag per identifier and the run
after it writes nothing. A run whose server dies says what it wrote before it stopped, and leaves a report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LAUNCHER, ROOT

from leukofhir.fhir.client import FhirClient
from support.faultproxy import Fault, FaultProxy
from support.fhir_builders import at, observation, patient
from support.ports import session_port
from support.server_data import flags_by_identifier, project_flags, put

pytestmark = pytest.mark.fhir

CLI = [sys.executable, "-m", "leukofhir.cli"]
TRANSACTION = r"/fhir/?$"
NOTHING = {"create": 0, "update": 0, "withdraw": 0, "delete": 0, "refused": 0, "conflict": 0}
WAIT = 300


def _patients(unique: str, tag: str, n: int = 10) -> tuple[list[str], list[dict]]:
    """`n` patients, each with a low WBC and (every other one) a recovery: one Flag each."""
    pids = [f"{tag}{k}-{unique}" for k in range(n)]
    resources = [patient(p) for p in pids]
    for k, pid in enumerate(pids):
        resources.append(observation(f"{pid}-w", "wbc", 2.0 + k / 10, time=at(), patient=f"Patient/{pid}"))
        if k % 2:
            resources.append(observation(f"{pid}-ok", "wbc", 6.0, time=at(days=5), patient=f"Patient/{pid}"))
    return pids, resources


def _run(base_url: str, pids: list[str], out: Path, *extra: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *CLI,
            "run",
            "--fhir-url",
            base_url,
            "--patients",
            ",".join(pids),
            "--batch-size",
            "5",
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _start_run(base_url: str, pids: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "run", "--fhir-url", base_url, "--patients", ",".join(pids), "--batch-size", "5", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _writes(out: Path) -> dict:
    writes = json.loads((out / "report.json").read_text())["writes"]
    return {k: writes.get(k, 0) for k in NOTHING}


def assert_converges(base_url: str, client: FhirClient, pids: list[str], tmp_path: Path) -> None:
    """The next run leaves one Flag per identifier, one per patient here; the run after it writes nothing."""
    after = _run(base_url, pids, tmp_path / "after")
    assert after.returncode == 0, after.stderr[-3000:]
    flags = project_flags(client, pids)
    assert len(flags_by_identifier(flags)) == len(flags) == len(pids)
    again = _run(base_url, pids, tmp_path / "again")
    assert again.returncode == 0 and _writes(tmp_path / "again") == NOTHING, again.stdout


def wait_for(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.parametrize("transaction", [1, 2])
def test_a_run_killed_at_a_transaction_converges_on_the_next_run(
    transaction, fhir_base_url, fhir_client, unique, tmp_path
):
    pids, resources = _patients(unique, f"kill{transaction}-")
    put(fhir_client, *resources)
    with FaultProxy(fhir_base_url) as proxy:
        held = Fault("hold", method="POST", path_regex=TRANSACTION, seconds=WAIT)
        passed = [Fault("delay", method="POST", path_regex=TRANSACTION)] * (transaction - 1)  # let earlier ones by
        proxy.add(*passed, held)
        run = _start_run(proxy.base_url, pids, tmp_path / "killed")
        try:
            assert held.arrived.wait(WAIT), "the transaction never came"
            os.kill(run.pid, signal.SIGKILL)
            run.wait(30)
        finally:
            held.release.set()  # the server still gets the transaction its client no longer waits for
            run.kill()
    assert run.returncode == -signal.SIGKILL
    # What the killed run had sent is applied all the same.
    assert wait_for(lambda: len(project_flags(fhir_client, pids)) == 5 * transaction)
    assert_converges(fhir_base_url, fhir_client, pids, tmp_path)


def test_a_server_that_vanishes_mid_run_ends_it_with_exit_4_what_was_written_and_a_report(
    fhir_base_url, fhir_client, unique, tmp_path
):
    pids, resources = _patients(unique, "gone-")
    put(fhir_client, *resources)
    with FaultProxy(fhir_base_url) as proxy:
        # The first batch is written; every try of the second one's transaction loses its connection.
        proxy.add(
            Fault("delay", method="POST", path_regex=TRANSACTION),
            *[Fault("reset", method="POST", path_regex=TRANSACTION) for _ in range(5)],
        )
        out = tmp_path / "failed"
        done = _run(proxy.base_url, pids, out)
    assert done.returncode == 4, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert "the FHIR server failed during the run" in message and "Traceback" not in done.stderr
    assert (
        "written before it stopped: Flags created 5, updated 0, withdrawn 0; 1 of 2 batches done, 5 patients "
        "not written; re-running is safe" in message
    )
    assert message.endswith(f"report: {out / 'report.html'}")
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "no answer after 5 tries" in report["error"]
    assert (report["chunks"], report["chunks_written"], report["patients_not_written"]) == (2, 1, 5)
    assert report["writes"]["create"] == 5 and report["reconciled"]
    html = (out / "report.html").read_text()
    assert "This run stopped before the end" in html and "no answer after 5 tries" in html
    assert_converges(fhir_base_url, fhir_client, pids, tmp_path)


@pytest.fixture
def own_server(tmp_path):
    """A HAPI server of this test's own (a port of the session's range, a data folder in tmp): it gets killed."""
    env = dict(os.environ, FHIR_PORT=str(session_port(15)), FHIR_DATA_DIR=str(tmp_path / "hapi"))

    def start() -> str:
        started = subprocess.run([LAUNCHER, "start"], env=env, capture_output=True, text=True, timeout=900)
        assert started.returncode == 0, started.stderr[-3000:]
        return started.stdout.strip().splitlines()[-1].rstrip("/")

    def kill() -> None:
        pid = int((ROOT / "fhir-server" / "target" / f"fhir-server-{env['FHIR_PORT']}.pid").read_text())
        os.kill(pid, signal.SIGKILL)

    try:
        yield start, kill
    finally:
        subprocess.run([LAUNCHER, "stop"], env=env, capture_output=True, text=True, timeout=120)


def test_hapi_killed_while_a_transaction_is_on_its_way(own_server, unique, tmp_path):
    start, kill = own_server
    base_url = start()
    pids, resources = _patients(unique, "hapi-")
    with FhirClient(base_url) as client:
        put(client, *resources)
    with FaultProxy(base_url) as proxy:
        held = Fault("hold", method="POST", path_regex=TRANSACTION, seconds=WAIT)
        proxy.add(Fault("delay", method="POST", path_regex=TRANSACTION), held)  # the second transaction is held
        run = _start_run(proxy.base_url, pids, tmp_path / "crashed")
        assert held.arrived.wait(WAIT), "the second transaction never came"
        kill()
        held.release.set()
        _, stderr = run.communicate(timeout=WAIT)
    assert run.returncode == 4, stderr[-3000:]
    assert "written before it stopped: Flags created 5" in stderr and "re-running is safe" in stderr
    assert json.loads((tmp_path / "crashed" / "report.json").read_text())["status"] == "failed"

    assert start() == base_url  # the same server, its data kept
    with FhirClient(base_url) as client:
        assert len(project_flags(client, pids)) == 5
        assert_converges(base_url, client, pids, tmp_path)
