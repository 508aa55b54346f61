"""A site's own canonical base, and a move from one base to another, against the real HAPI server (issue 21)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from leukofhir.config import load_config
from leukofhir.conformance.publish import publish
from leukofhir.extract.run_folder import chunk_dirs
from leukofhir.extract.search import Window, read_patient_list
from leukofhir.run import run_pipeline
from support.fhir_builders import days_ago, observation, patient, statement
from support.server_data import project_flags, put, versions
from support.site_rules import rules_with_base, strings_in

pytestmark = pytest.mark.fhir


def _read(run_dir) -> list[str]:
    """The patients a run read and evaluated."""
    return [p for chunk in chunk_dirs(run_dir) for p in read_patient_list(chunk / "patients.json")]


def _validate(client, flag: dict, profile: str) -> list[str]:
    outcome = client.request_json("POST", "Flag/$validate", params={"profile": profile}, json=flag)
    return [
        f"{i['severity']}: {i.get('diagnostics')}"
        for i in outcome.get("issue") or []
        if i.get("severity") in ("fatal", "error", "warning")
    ]


def test_flags_move_to_a_new_base_in_place_and_validate_against_its_profile(fhir_client, unique, tmp_path, own_tag):
    _, on_server = own_tag  # the test's patients, whose results are removed afterwards
    old_base, new_base = f"https://old-{unique}.example/leukofhir", f"https://fhir.hospital-{unique}.example/leukofhir"
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = load_config(rules_with_base(tmp_path / "old", old_base, tag_code=f"own-{unique}"))
    new = load_config(rules_with_base(tmp_path / "new", new_base, [old_base], tag_code=f"own-{unique}"))
    now = datetime.now(timezone.utc).replace(microsecond=0)
    pids = [f"cb{n}-{unique}" for n in range(3)]
    on_server += pids
    put(
        fhir_client,
        *(patient(p) for p in pids),
        observation(f"{pids[0]}-a", "anc", 0.3, time=days_ago(5, now=now), patient=f"Patient/{pids[0]}"),
        statement(f"{pids[0]}-m", "clozapine", start=days_ago(30, now=now), patient_ref=f"Patient/{pids[0]}"),
        observation(f"{pids[1]}-w", "wbc", 2.0, time=days_ago(9, now=now), patient=f"Patient/{pids[1]}"),
        observation(f"{pids[1]}-w2", "wbc", 5.0, time=days_ago(8, now=now), patient=f"Patient/{pids[1]}"),
        observation(f"{pids[2]}-l", "lymphocytes_abs", 0.4, time=days_ago(3, now=now), patient=f"Patient/{pids[2]}"),
    )

    first = run_pipeline(fhir_client, old, tmp_path / "first", patients=pids, now=now)
    assert first["writes"]["create"] == 3
    before = {f["id"]: f for f in project_flags(fhir_client, pids, old)}
    assert all(f["meta"]["profile"] == [old.uris.flag_profile] for f in before.values())
    # Patient 2's low result is withdrawn by its lab: under the new base its Flag is withdrawn, not duplicated.
    put(
        fhir_client,
        observation(
            f"{pids[2]}-l",
            "lymphocytes_abs",
            0.4,
            time=days_ago(3, now=now),
            patient=f"Patient/{pids[2]}",
            status="entered-in-error",
        ),
    )

    publish(fhir_client, new)
    # A window that touches none of these patients: the run finds them by their Flags under the previous base.
    empty = Window(now - timedelta(days=3650), now - timedelta(days=3649))
    moved = run_pipeline(fhir_client, new, tmp_path / "moved", window=empty, now=now)
    assert moved["writes"]["create"] == 0 and moved["writes"]["update"] + moved["writes"].get("withdraw", 0) == 3
    after = {f["id"]: f for f in project_flags(fhir_client, pids, new)}
    assert set(after) == set(before)  # rewritten in place: same ids, none added
    assert project_flags(fhir_client, pids, old) == []  # nothing left under the old base's tag
    for flag in after.values():
        assert flag["meta"]["versionId"] == "2"
        assert not [s for s in strings_in(flag) if old_base in s], flag["id"]
        assert flag["meta"]["profile"] == [new.uris.flag_profile]
        assert flag["identifier"][0]["system"] == f"{new_base}/flag-episode"
        assert _validate(fhir_client, flag, new.uris.flag_profile) == []
    assert sorted(f["status"] for f in after.values()) == ["active", "entered-in-error", "inactive"]

    assert set(pids) <= set(_read(tmp_path / "moved"))
    again = run_pipeline(fhir_client, new, tmp_path / "again", window=empty, now=now)
    # Converged: the previous base's tag is gone, so the run no longer finds these patients (others on the session's
    # server, deleted since the window began, may be read), and nothing is written.
    assert not set(pids) & set(_read(tmp_path / "again"))
    assert not any(n for k, n in again["writes"].items() if k != "unchanged")
    assert versions(project_flags(fhir_client, pids, new)) == versions(after.values())
