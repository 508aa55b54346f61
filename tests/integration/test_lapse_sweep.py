"""The daily lapse sweep against the real server (clinical-rules v1.3 §4): a patient whose data does not change is
touched by no window, yet their active Flag lapses; the sweep finds them from the project's active Flags."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from leukofhir.config import load_config
from leukofhir.extract.run_folder import chunk_dirs
from leukofhir.extract.search import read_patient_list
from leukofhir.run import run_pipeline
from support.fhir_builders import days_ago, observation, patient, report
from support.server_data import project_flags, put, versions

pytestmark = pytest.mark.fhir

CLI = [sys.executable, "-m", "leukofhir.cli"]
NOTHING_WRITTEN = {"create": 0, "update": 0, "withdraw": 0, "delete": 0, "refused": 0}


def _writes(done: dict) -> dict:
    return {k: done["writes"][k] for k in NOTHING_WRITTEN}


def _read(run_dir) -> list[str]:
    """The patients a run read and evaluated."""
    return [p for chunk in chunk_dirs(run_dir) for p in read_patient_list(chunk / "patients.json")]


def test_the_sweep_closes_a_flag_whose_patient_has_had_no_count_for_longer_than_the_lapse(
    fhir_base_url, fhir_client, unique, tmp_path, own_tag
):
    # The project's Flags of this test only: their own tag (the sweep reads every active project Flag of the server).
    config, put_on_server = own_tag
    rules = load_config(config)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    old, recent, deleted, untimed = (f"{kind}-{unique}" for kind in ("old", "recent", "deleted", "untimed"))
    put_on_server += [old, recent, deleted, untimed]
    count_time = days_ago(89, now=now)
    put(
        fhir_client,
        *(patient(p) for p in (old, recent, deleted, untimed)),
        observation(f"{old}-w", "wbc", 2.1, time=count_time, patient=f"Patient/{old}"),
        observation(f"{recent}-w", "wbc", 2.1, time=days_ago(10, now=now), patient=f"Patient/{recent}"),
        observation(f"{deleted}-w", "wbc", 2.1, time=days_ago(10, now=now), patient=f"Patient/{deleted}"),
        # Its time is its report's: the sweep does not look reports up, so this Flag is a candidate every day, and
        # the rules, reading the report, keep it as it is.
        observation(f"{untimed}-w", "wbc", 2.1, time=False, patient=f"Patient/{untimed}"),
        report(f"{untimed}-r", [f"{untimed}-w"], time=days_ago(10, now=now), patient_ref=f"Patient/{untimed}"),
    )
    pids = [old, recent, deleted, untimed]

    first = run_pipeline(fhir_client, rules, tmp_path / "first", patients=pids, now=now)
    assert first["writes"]["create"] == 4 and first["sweep"] is None
    written = {f["subject"]["reference"]: f for f in project_flags(fhir_client, pids, rules)}
    assert {f["status"] for f in written.values()} == {"active"}  # 89 days: still followed

    fhir_client.request("DELETE", f"Observation/{deleted}-w")  # the Flag's only evidence gone
    # Two days later, the patients' data unchanged: the sweep alone (no window, no patients named).
    later = now + timedelta(days=2)
    swept = run_pipeline(fhir_client, rules, tmp_path / "swept", lapse_sweep=True, now=later)
    assert swept["sweep"] == {"candidates": 3, "flags_read": 4, "added": 3}
    assert _read(tmp_path / "swept") == sorted([old, deleted, untimed])  # the recent count's patient is not read
    assert swept["as_of"] == later.isoformat()
    assert _writes(swept) == {**NOTHING_WRITTEN, "update": 1, "withdraw": 1}
    after = {f["subject"]["reference"]: f for f in project_flags(fhir_client, pids, rules)}
    lapsed = after[f"Patient/{old}"]
    assert lapsed["id"] == written[f"Patient/{old}"]["id"] and lapsed["status"] == "inactive"
    assert lapsed["period"] == {"start": count_time, "end": count_time}  # ends at its last low value
    assert lapsed["code"]["text"].endswith("; no follow-up count for more than 90 days")
    assert "transient" not in lapsed["code"]["text"]
    assert after[f"Patient/{deleted}"]["status"] == "entered-in-error"
    for pid in (recent, untimed):
        assert after[f"Patient/{pid}"] == written[f"Patient/{pid}"]  # not written, same version

    again = run_pipeline(fhir_client, rules, tmp_path / "again", lapse_sweep=True, now=later + timedelta(hours=1))
    assert _writes(again) == NOTHING_WRITTEN and again["writes"]["unchanged"] == 1
    # The closed and withdrawn Flags are read no more: the server sends the open ones (period without an end).
    assert again["sweep"] == {"candidates": 1, "flags_read": 2, "added": 1} and _read(tmp_path / "again") == [untimed]
    assert versions(project_flags(fhir_client, pids, rules)) == versions(after.values())

    # By hand, as of now (the command has no other time): nothing lapses yet, the summary says what the sweep did.
    done = subprocess.run(
        [
            *CLI,
            "run",
            "--fhir-url",
            fhir_base_url,
            "--lapse-sweep",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 patients touched; Flags created 0, updated 0, withdrawn 0, unchanged 1" in done.stdout
    assert "lapse sweep: 1 patients added (1 whose active Flags may have lapsed, of 2 active Flags read)" in done.stdout
    cli_report = json.loads((tmp_path / "cli" / "report.json").read_text(encoding="utf-8"))
    assert cli_report["window"] is None and cli_report["sweep"] == {"candidates": 1, "flags_read": 2, "added": 1}


def test_the_sweep_added_to_a_window_evaluates_each_patient_once(fhir_client, unique, tmp_path, own_tag):
    from leukofhir.extract.search import Window
    from support.server_data import pause, server_now

    config, put_on_server = own_tag
    rules = load_config(config)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    lapsing, touched = f"lapsing-{unique}", f"touched-{unique}"
    put_on_server += [lapsing, touched]
    put(
        fhir_client,
        patient(lapsing),
        patient(touched),
        observation(f"{lapsing}-w", "wbc", 2.1, time=days_ago(89, now=now), patient=f"Patient/{lapsing}"),
    )
    run_pipeline(fhir_client, rules, tmp_path / "first", patients=[lapsing], now=now)
    since = server_now(fhir_client)
    # In the window: a new count of the lapsing patient (it follows the episode up) and a new patient's count.
    put(
        fhir_client,
        observation(f"{lapsing}-w2", "wbc", 2.4, time=days_ago(1, now=now), patient=f"Patient/{lapsing}"),
        observation(f"{touched}-w", "wbc", 1.9, time=days_ago(1, now=now), patient=f"Patient/{touched}"),
    )
    pause()
    window = Window.parse(since, server_now(fhir_client))
    later = now + timedelta(days=2)
    done = run_pipeline(fhir_client, rules, tmp_path / "window", window=window, lapse_sweep=True, now=later)
    # The lapsing patient is both touched and a candidate (their Flag's evidence is still the 89-day-old count): read
    # once, and the new count keeps the episode open.
    assert done["sweep"] == {"candidates": 1, "flags_read": 1, "added": 0}
    assert done["patients_touched"] == 2 and _read(tmp_path / "window") == sorted([lapsing, touched])
    flags = {f["subject"]["reference"]: f for f in project_flags(fhir_client, [lapsing, touched], rules)}
    assert {ref: f["status"] for ref, f in flags.items()} == {
        f"Patient/{lapsing}": "active",
        f"Patient/{touched}": "active",
    }
