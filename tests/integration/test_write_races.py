"""Two writers of one patient's Flags at once, against the real server: whatever the interleaving, the server ends
with the Flags a fresh run wants, and the next run writes nothing.

A run (R1) reads the patient, then its write transaction is held by the fault proxy; the patient's data changes;
a second run (R2) reads the new data and writes (or finds nothing to write); then R1's write is let through. In the
other order R2's write is held too and lands last. R1's write names the version it read, so it cannot land over
R2's; and R1 checks, once written, whether the patient's data moved since it read it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import pytest

from leukofhir.config import load_config
from leukofhir.fhir.client import FhirClient
from leukofhir.run import run_pipeline
from support.faultproxy import Fault, FaultProxy
from support.fhir_builders import days_ago, observation, patient
from support.server_data import flags_by_identifier, project_flags, put, versions

pytestmark = pytest.mark.fhir

RULES = load_config()
CLI = [sys.executable, "-m", "leukofhir.cli"]
TRANSACTION = r"/fhir/?$"  # a POST to the base: a transaction Bundle
NOTHING = {"create": 0, "update": 0, "withdraw": 0, "delete": 0, "refused": 0, "conflict": 0}
WAIT = 180


def hold() -> Fault:
    return Fault("hold", method="POST", path_regex=TRANSACTION, seconds=WAIT)


class Run(threading.Thread):
    """run_pipeline for some patients in a thread, through `base_url` (the proxy, to be held)."""

    def __init__(self, base_url: str, patients: list[str], out):
        super().__init__(daemon=True)
        self.base_url, self.patients, self.out = base_url, patients, out
        self.report: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with FhirClient(self.base_url, backoff=0.01) as client:
                self.report = run_pipeline(client, RULES, self.out, patients=self.patients)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def result(self) -> dict:
        self.join(WAIT)
        assert not self.is_alive(), "the run did not finish"
        if self.error is not None:
            raise self.error
        return self.report


def run(base_url: str, patients: list[str], out, **options) -> dict:
    with FhirClient(base_url, backoff=0.01) as client:
        return run_pipeline(client, RULES, out, patients=patients, **options)


def wait_until(event: threading.Event, run: Run, what: str) -> None:
    """Until the held request has arrived (or the run ended without sending one)."""
    for _ in range(WAIT * 10):
        if event.wait(0.1) or not run.is_alive():
            return
    pytest.fail(f"{what} never arrived")


def standing(flags: list[dict]) -> list[dict]:
    return [f for f in flags if f["status"] != "entered-in-error"]


def grade(flag: dict) -> int:
    (value,) = [e["valueInteger"] for e in flag.get("extension", []) if e["url"] == RULES.uris.ctcae_grade_extension]
    return value


@dataclass
class Race:
    """`before`: the patient's data (and Flags) before R1 reads; `change`: what happens between R1's read and R2's;
    `expect`: the patient's standing Flags once both ran."""

    before: Callable
    change: Callable
    expect: Callable[[list[dict]], bool]


# The races' counts lie within the last month: a run evaluates as of its own time, and an episode without a count for
# more than 90 days has lapsed (clinical-rules v1.3 §4); these tests are about writers, not the lapse.
NOW = datetime.now(timezone.utc)


def _wbc(pid: str, suffix: str, value: float, days: float, **extra) -> dict:
    """A WBC `days` after the start of the races' month (30 days ago)."""
    return observation(
        f"{pid}-{suffix}", "wbc", value, time=days_ago(30 - days, now=NOW), patient=f"Patient/{pid}", **extra
    )


def _flagged(client, base_url, pid, tmp_path, *resources):
    """Put the resources, then let a run write the patient's Flags (the Flag an update or withdrawal starts from)."""
    put(client, *resources)
    run(base_url, [pid], tmp_path / "first")
    assert len(project_flags(client, [pid])) == 1


def _amended(resource: dict, value: float) -> dict:
    return {**resource, "status": "amended", "valueQuantity": {**resource["valueQuantity"], "value": value}}


def _one(expect_status: str, expect_grade: int, text: str | None = None):
    def check(flags: list[dict]) -> bool:
        (flag,) = flags
        return (flag["status"], grade(flag)) == (expect_status, expect_grade) and (
            text is None or text in flag["code"]["text"]
        )

    return check


def race(name: str, client, base_url: str, pid: str, tmp_path) -> Race:
    low = _wbc(pid, "low", 2.0, 0)
    if name == "create, recovered meanwhile":
        # The first case: R1 wants an active Flag; a normal count arrives; R2 writes it inactive.
        return Race(
            lambda: put(client, low),
            lambda: put(client, _wbc(pid, "ok", 6.0, 1)),
            _one("inactive", 2, "transient low count"),
        )
    if name == "create, its recovery retracted meanwhile":
        # The second case: R1 wants the Flag closed; the normal count is marked entered-in-error.
        ok = _wbc(pid, "ok", 6.0, 1)
        return Race(
            lambda: put(client, low, ok), lambda: put(client, {**ok, "status": "entered-in-error"}), _one("active", 2)
        )
    if name == "escalation, recovered meanwhile":
        return Race(
            lambda: (
                _flagged(client, base_url, pid, tmp_path, _wbc(pid, "g1", 3.5, 0)),
                put(client, _wbc(pid, "g3", 1.5, 2)),
            ),
            lambda: put(client, _wbc(pid, "ok", 6.0, 6)),
            _one("inactive", 3),
        )
    if name == "escalation retracted meanwhile":
        # R2 finds the Flag on the server right (grade 1) and writes nothing: only R1's check of its data saves it.
        lower = _wbc(pid, "g3", 1.5, 2)
        return Race(
            lambda: (_flagged(client, base_url, pid, tmp_path, _wbc(pid, "g1", 3.5, 0)), put(client, lower)),
            lambda: put(client, {**lower, "status": "entered-in-error"}),
            _one("active", 1),
        )
    if name == "recovery, amended back to low meanwhile":
        ok = _wbc(pid, "ok", 6.0, 5)
        return Race(
            lambda: (_flagged(client, base_url, pid, tmp_path, low), put(client, ok)),
            lambda: put(client, _amended(ok, 2.5)),
            _one("active", 2),
        )
    if name == "withdrawal (amended), amended low again meanwhile":
        return Race(
            lambda: (_flagged(client, base_url, pid, tmp_path, low), put(client, _amended(low, 6.0))),
            lambda: put(client, _amended(low, 1.5)),
            _one("active", 3),
        )
    if name == "withdrawal (deleted), a new low meanwhile":

        def before():
            _flagged(client, base_url, pid, tmp_path, low)
            client.request("DELETE", f"Observation/{low['id']}")

        return Race(before, lambda: put(client, _wbc(pid, "again", 1.2, 0)), _one("active", 3))
    if name == "withdrawal (entered-in-error), corrected meanwhile":
        return Race(
            lambda: (
                _flagged(client, base_url, pid, tmp_path, low),
                put(client, {**low, "status": "entered-in-error"}),
            ),
            lambda: put(client, {**low, "status": "corrected"}),
            _one("active", 2),
        )
    raise ValueError(name)


RACES = [
    "create, recovered meanwhile",
    "create, its recovery retracted meanwhile",
    "escalation, recovered meanwhile",
    "escalation retracted meanwhile",
    "recovery, amended back to low meanwhile",
    "withdrawal (amended), amended low again meanwhile",
    "withdrawal (deleted), a new low meanwhile",
    "withdrawal (entered-in-error), corrected meanwhile",
]


def written(report: dict) -> dict:
    return {k: report["writes"].get(k, 0) for k in NOTHING}


def assert_converged(client, base_url: str, pids: list[str], out) -> list[dict]:
    """A fresh run of the patients writes nothing (the server holds exactly the Flags it wants), nor does the next."""
    flags = project_flags(client, pids)
    flags_by_identifier(flags)  # one Flag per identifier
    fresh = run(base_url, pids, out / "fresh-dry", dry_run=True)
    assert written(fresh) == NOTHING, f"a fresh run would write: {fresh['writes']}"
    again = run(base_url, pids, out / "next")
    assert written(again) == NOTHING
    assert versions(project_flags(client, pids)) == versions(flags)
    return flags


def prepared(name: str, client, base_url: str, pid: str, tmp_path) -> Race:
    put(client, patient(pid))
    case = race(name, client, base_url, pid, tmp_path)
    case.before()
    return case


def start_held(proxy: FaultProxy, pid: str, out, who: str) -> tuple[Fault, Run]:
    """A run of the patient through the proxy, once its transaction is held (or it ended with nothing to write)."""
    held = hold()
    proxy.add(held)
    started = Run(proxy.base_url, [pid], out)
    started.start()
    wait_until(held.arrived, started, f"{who}'s transaction")
    return held, started


@pytest.mark.parametrize("name", RACES)
def test_a_held_stale_write_lands_after_the_new_one(name, fhir_base_url, fhir_client, unique, tmp_path):
    pid = f"late-{unique}"
    case = prepared(name, fhir_client, fhir_base_url, pid, tmp_path)
    with FaultProxy(fhir_base_url) as proxy:
        held, r1 = start_held(proxy, pid, tmp_path / "r1", "R1")
        assert r1.is_alive(), "R1 had nothing to write"
        case.change()
        r2 = run(fhir_base_url, [pid], tmp_path / "r2")
        held.release.set()
        r1_report = r1.result()
    flags = assert_converged(fhir_client, fhir_base_url, [pid], tmp_path)
    assert case.expect(standing(flags)), standing(flags)
    assert r1_report["writes"]["reevaluated"] >= 1  # R1 read the patient again instead of keeping its stale decision
    assert r1_report["writes"]["conflict"] == r2["writes"]["conflict"] == 0 and r1_report["status"] == "done"


@pytest.mark.parametrize("name", RACES)
def test_a_held_new_write_lands_after_the_stale_one(name, fhir_base_url, fhir_client, unique, tmp_path):
    pid = f"early-{unique}"
    case = prepared(name, fhir_client, fhir_base_url, pid, tmp_path)
    with FaultProxy(fhir_base_url) as proxy:
        first, r1 = start_held(proxy, pid, tmp_path / "r1", "R1")
        case.change()
        second, r2 = start_held(proxy, pid, tmp_path / "r2", "R2")  # or R2 found nothing to write
        first.release.set()
        r1_report = r1.result()
        second.release.set()
        r2_report = r2.result()
    flags = assert_converged(fhir_client, fhir_base_url, [pid], tmp_path)
    assert case.expect(standing(flags)), standing(flags)
    assert r1_report["writes"]["conflict"] == r2_report["writes"]["conflict"] == 0


def test_a_flag_that_keeps_moving_is_reported_as_a_conflict_and_never_written_blindly(
    fhir_base_url, fhir_client, unique, tmp_path
):
    pid = f"busy-{unique}"
    put(fhir_client, patient(pid), _wbc(pid, "low", 2.0, 0))
    run(fhir_base_url, [pid], tmp_path / "first")
    (flag,) = project_flags(fhir_client, [pid])
    put(fhir_client, _wbc(pid, "ok", 6.0, 5))  # the next run wants the Flag closed
    edits: list[str] = []

    def another_writer(method: str, path: str, headers: dict):
        """Before each of the run's transactions, someone else writes the Flag: its version always moves on."""
        if method == "POST" and re.search(TRANSACTION, path):
            with FhirClient(fhir_base_url) as other:
                current = other.read("Flag", flag["id"])
                current["code"]["text"] = f"edited by another writer, {len(edits) + 1}"
                edits.append(other.update(current)["meta"]["versionId"])
        return None

    out = tmp_path / "busy"
    with FaultProxy(fhir_base_url, gate=another_writer) as proxy:
        done = subprocess.run(
            [*CLI, "run", "--fhir-url", proxy.base_url, "--patients", pid, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
    (now,) = project_flags(fhir_client, [pid])
    assert now["code"]["text"] == f"edited by another writer, {len(edits)}"  # the other writer's stands
    assert done.returncode == 1, done.stderr[-3000:]  # done, but a write was not applied
    assert "unchanged 0, in conflict 1;" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert (report["writes"]["conflict"], report["writes"]["update"], report["writes"]["reevaluated"]) == (1, 0, 3)
    assert len(edits) == 4  # the first try and three more, each decided again from a fresh read
    (rejected,) = [json.loads(line) for line in (out / "rejects.ndjson").read_text().splitlines()]
    assert rejected["conflict"] is True and rejected["status"] == 409 and rejected["flag_id"] == flag["id"]
    assert "HAPI-0989" in json.dumps(rejected["outcome"])
    assert 'id="writes-conflict">1<' in (out / "report.html").read_text()

    run(fhir_base_url, [pid], tmp_path / "quiet")  # once the other writer stops, the next run decides it
    (closed,) = standing(assert_converged(fhir_client, fhir_base_url, [pid], tmp_path))
    assert closed["status"] == "inactive"


def test_a_flag_deleted_by_hand_is_written_again_over_its_deletion(fhir_base_url, fhir_client, unique, tmp_path):
    pid = f"undel-{unique}"
    put(fhir_client, patient(pid), _wbc(pid, "low", 2.0, 0))
    run(fhir_base_url, [pid], tmp_path / "first")
    (flag,) = project_flags(fhir_client, [pid])
    fhir_client.request("DELETE", f"Flag/{flag['id']}")
    # The next run wants it created; `If-Match: W/"0"` meets the deleted versions (HAPI-0989), so the patient is
    # decided again and the Flag written over the deletion's version.
    again = run(fhir_base_url, [pid], tmp_path / "again")
    assert (again["writes"]["create"], again["writes"]["reevaluated"], again["writes"]["conflict"]) == (1, 1, 0)
    (back,) = project_flags(fhir_client, [pid])
    assert back["id"] == flag["id"] and int(back["meta"]["versionId"]) == int(flag["meta"]["versionId"]) + 2
    assert_converged(fhir_client, fhir_base_url, [pid], tmp_path)
