"""The DAGs writing one patient's Flags at once (dag.test() against the real HAPI server): the hourly surveillance DAG
and a `leukopenia_patients` run, two backfills over overlapping windows. One run goes through the fault proxy, in its
own process (its own Airflow home), and its write transaction is held while the patients' data changes and the other
run writes; then it is let through. The server ends with the Flags a fresh run wants, and the next run writes
nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_pipeline_dags import dags, run_dag, writes  # noqa: F401 - `dags` is the fixture

from leukofhir.fhir.client import FhirClient
from leukofhir.run import run_pipeline
from support.faultproxy import Fault, FaultProxy
from support.fhir_builders import at, observation, patient
from support.server_data import RULES, flags_by_identifier, pause, project_flags, put, server_now, versions

pytestmark = [pytest.mark.fhir, pytest.mark.dag_run]

TRANSACTION = r"/fhir/?$"
NOTHING = {"create": 0, "update": 0, "withdraw": 0, "delete": 0, "refused": 0}
WAIT = 600

# dag.test() of one DAG in a process of its own: a fresh Airflow home (migrated here), the `fhir_default` connection
# given in the environment; prints the run's state and run folder as its last line.
DAG_TEST = """
import json, os, re, subprocess, sys
from pathlib import Path
migrated = subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], capture_output=True,
                          text=True)
assert migrated.returncode == 0, migrated.stderr[-2000:]
from airflow.dag_processing.dagbag import DagBag
dag_id, conf = sys.argv[1], json.loads(sys.argv[2])
run = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).dags[dag_id].test(run_conf=conf)
folder = Path(os.environ["AIRFLOW_HOME"]) / "leukofhir-runs" / dag_id / re.sub(r"[^A-Za-z0-9._-]+", "_", run.run_id)
print(json.dumps({"state": str(run.state), "folder": str(folder)}))
"""


class HeldDag:
    """A DAG run in a process of its own, talking to the FHIR server through `proxy`, whose first transaction the
    proxy holds until `release()`."""

    def __init__(self, proxy: FaultProxy, home: Path, dag_id: str, **conf):
        self.held = Fault("hold", method="POST", path_regex=TRANSACTION, seconds=WAIT)
        proxy.add(self.held)
        env = dict(
            os.environ,
            AIRFLOW_HOME=str(home),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
            AIRFLOW_CONN_FHIR_DEFAULT=json.dumps({"conn_type": "fhir", "host": proxy.base_url}),
        )
        home.mkdir(parents=True)
        self.log = open(home / "dag-test.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-c", DAG_TEST, dag_id, json.dumps(conf)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_held(self) -> None:
        for _ in range(WAIT * 10):
            if self.held.arrived.wait(0.1):
                return
            assert self.process.poll() is None, f"the DAG run ended before writing:\n{self.tail()}"
        pytest.fail("the DAG run's transaction never came")

    def release(self) -> dict:
        """Let the held transaction through; the run's report once it ends (successfully)."""
        self.held.release.set()
        self.process.wait(WAIT)
        (last,) = self.tail().strip().splitlines()[-1:]
        outcome = json.loads(last)
        assert self.process.returncode == 0 and outcome["state"] == "success", self.tail()
        return json.loads((Path(outcome["folder"]) / "report.json").read_text())

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-6000:]

    def close(self) -> None:
        self.held.release.set()
        if self.process.poll() is None:
            self.process.kill()
        self.log.close()


def _wbc(pid: str, suffix: str, value: float, days: float, **extra) -> dict:
    return observation(f"{pid}-{suffix}", "wbc", value, time=at(days=days), patient=f"Patient/{pid}", **extra)


def _state(flag: dict) -> str:
    """What a Flag says of its episode: entered-in-error, active, or inactive as transient, recovered or lapsed."""
    text = flag["code"]["text"]
    if flag["status"] != "inactive":
        return flag["status"]
    if "transient low count" in text:
        return "transient"
    return "lapsed" if "no follow-up count for more than" in text else "recovered"


def assert_converged(client, pids: list[str], tmp_path: Path) -> list[dict]:
    """A fresh evaluation of the patients would write nothing; the server holds one Flag per identifier."""
    flags = project_flags(client, pids)
    flags_by_identifier(flags)
    with FhirClient(client.base_url) as fresh:
        report = run_pipeline(fresh, RULES, tmp_path / "fresh", patients=pids, dry_run=True)
    assert writes(report) == NOTHING, f"a fresh run would write: {report['writes']}"
    return flags


@pytest.mark.parametrize("held", ["surveillance", "patients"])
def test_the_surveillance_dag_and_a_patients_run_on_one_patient_at_once(
    held,
    dags,  # noqa: F811 - `dags`, the fixture
    fhir_client,
    fhir_base_url,
    unique,
    tmp_path,
):
    pid = f"dag-{held}-{unique}"
    put(fhir_client, patient(pid))
    since = server_now(fhir_client)
    put(fhir_client, _wbc(pid, "low", 2.0, 0))
    pause()
    until = server_now(fhir_client)
    window = {"start": since.isoformat(), "end": until.isoformat()}
    with FaultProxy(fhir_base_url) as proxy:
        slow = (
            HeldDag(proxy, tmp_path / "held", "leukopenia_surveillance", **window)
            if held == "surveillance"
            else HeldDag(proxy, tmp_path / "held", "leukopenia_patients", patients=[pid])
        )
        try:
            slow.wait_held()  # it read the low count and wants an active Flag; its write waits
            put(fhir_client, _wbc(pid, "ok", 6.0, 1))  # a normal count within 72 h: a transient low
            pause()
            if held == "surveillance":
                fast = run_dag(dags, "leukopenia_patients", patients=[pid])
            else:
                fast = run_dag(
                    dags, "leukopenia_surveillance", start=since.isoformat(), end=server_now(fhir_client).isoformat()
                )
            assert fast["writes"]["create"] == 1
            late = slow.release()
        finally:
            slow.close()
    (flag,) = assert_converged(fhir_client, [pid], tmp_path)
    assert flag["status"] == "inactive" and "transient low count" in flag["code"]["text"]
    assert late["status"] == "done" and late["writes"]["reevaluated"] == 1 and late["writes"]["conflict"] == 0
    again = run_dag(dags, "leukopenia_patients", patients=[pid])
    assert writes(again) == NOTHING and versions(project_flags(fhir_client, [pid])) == versions([flag])


def test_two_backfills_over_overlapping_windows_at_once(dags, fhir_client, fhir_base_url, unique, tmp_path):  # noqa: F811 - `dags`, the fixture
    pids = [f"bf{n}-{unique}" for n in range(4)]
    # Clinical dates of this test's own, a century before other tests' (a backfill's window selects by date, and by
    # the period of the project's Flags: an open one overlaps every later window).
    day0 = -36000 - int(unique, 16) % 3000

    def wbc(pid: str, suffix: str, value: float, days: float) -> dict:
        return _wbc(pid, suffix, value, day0 + days)

    put(
        fhir_client,
        *(patient(p, birth="1880-01-01") for p in pids),
        *(wbc(p, "low", 2.0 + n / 10, n) for n, p in enumerate(pids)),
        wbc(pids[3], "ok", 6.0, 20),
    )
    first = {"start": at(days=day0 - 10), "end": at(days=day0 + 10), "chunks": 2}
    second = {"start": at(days=day0 - 5), "end": at(days=day0 + 30), "chunks": 2}
    with FaultProxy(fhir_base_url) as proxy:
        slow = HeldDag(proxy, tmp_path / "held", "leukopenia_backfill", **first)
        try:
            slow.wait_held()  # a chunk's write waits; the other chunk was staged from reads as old
            # Meanwhile patient 0 recovers within 72 h, patient 2's low is corrected to normal and patient 3's recovery
            # is entered in error; the second backfill writes what that means for 0, 1 and 3 (2: nothing).
            put(
                fhir_client,
                wbc(pids[0], "ok", 6.5, 1),
                {**wbc(pids[2], "low", 5.5, 2), "status": "corrected"},
                {**wbc(pids[3], "ok", 6.0, 20), "status": "entered-in-error"},
            )
            fast = run_dag(dags, "leukopenia_backfill", **second)
            assert fast["writes"]["create"] == 3
            late = slow.release()
        finally:
            slow.close()
    flags = assert_converged(fhir_client, pids, tmp_path)
    state = {f["subject"]["reference"].split("/")[1]: _state(f) for f in flags}
    # Patient 2's stale Flag was written, then withdrawn once its data was seen to have moved: it stays withdrawn.
    # Patients 1 and 3 are open episodes of a century ago, so lapsed as of the run (clinical-rules v1.3 §4); patient
    # 3's is open because its recovery was entered in error meanwhile (seen: lapsed; not seen: recovered).
    assert [state.get(p) for p in pids] == ["transient", "lapsed", "entered-in-error", "lapsed"]
    assert late["status"] == "done" and late["writes"]["reevaluated"] == 4 and late["writes"]["conflict"] == 0
    again = run_dag(dags, "leukopenia_backfill", start=at(days=day0 - 30), end=at(days=day0 + 40), chunks=3)
    assert writes(again) == NOTHING and versions(project_flags(fhir_client, pids)) == versions(flags)
