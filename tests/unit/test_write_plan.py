"""Planning Flag writes, without a server: every write names the version it was decided from."""

from __future__ import annotations

from leukofhir.config import load_config
from leukofhir.write import NEW, Change, _entry, apply_plan, flag_id, plan_writes

RULES = load_config()


def _flag(value: str, status: str = "active", *, version: str | None = None, fid: str | None = None,
          patient: str = "p1") -> dict:
    flag = {"resourceType": "Flag",
            "meta": {"tag": [{"system": RULES.uris.tag_system, "code": RULES.uris.tag_code}]},
            "identifier": [{"system": RULES.uris.identifier_system, "value": value}], "status": status,
            "code": {"text": "t"}, "subject": {"reference": f"Patient/{patient}"}}
    if version is not None:
        flag["meta"]["versionId"] = version
    if fid is not None:
        flag["id"] = fid
    return flag


def test_each_decision_names_the_version_and_the_patient_it_was_decided_from():
    existing = [_flag("same", version="4", fid="a"), _flag("moved", version="7", fid="b"),
                _flag("gone", version="2", fid="c", patient="p2"), _flag("dup", version="1", fid="d"),
                _flag("dup", version="3", fid="e")]
    desired = [_flag("same"), _flag("moved", "inactive"), _flag("new", patient="p3"), _flag("dup"),
               _flag("never", "entered-in-error")]
    plan = plan_writes(desired, existing, RULES)
    decided = {(d.action, d.identifier, d.flag_id, d.version, d.subject) for d in plan.decisions}
    assert decided == {
        ("unchanged", "same", "a", "4", "Patient/p1"),
        ("update", "moved", "b", "7", "Patient/p1"),
        ("withdraw", "gone", "c", "2", "Patient/p2"),
        ("delete", "dup", "e", "3", "Patient/p1"),
        ("unchanged", "dup", "d", "1", "Patient/p1"),
        ("create", "new", flag_id("new"), NEW, "Patient/p3"),
        ("not_created", "never", flag_id("never"), NEW, "Patient/p1"),
    }
    assert [c.action for c in plan.changes] == ["delete", "update", "create", "withdraw"]
    assert (plan.unchanged, plan.not_created) == (2, 1)
    assert plan.counts() == {"create": 1, "update": 1, "withdraw": 1, "delete": 1, "unchanged": 2, "not_created": 1}


def test_every_entry_carries_if_match():
    plan = plan_writes([_flag("moved", "inactive"), _flag("new")],
                       [_flag("moved", version="7", fid="b"), _flag("gone", version="2", fid="c"),
                        _flag("moved", version="9", fid="z")], RULES)
    entries = {c.action: _entry(c) for c in plan.changes}
    assert entries["update"]["request"] == {"method": "PUT", "url": "Flag/b", "ifMatch": 'W/"7"'}
    assert entries["withdraw"]["request"] == {"method": "PUT", "url": "Flag/c", "ifMatch": 'W/"2"'}
    assert entries["withdraw"]["resource"]["status"] == "entered-in-error"
    assert entries["delete"]["request"] == {"method": "DELETE", "url": "Flag/z", "ifMatch": 'W/"9"'}
    # A create names version 0, which no Flag ever has: HAPI refuses it when anything is or was at that id.
    assert entries["create"]["request"] == {"method": "PUT", "url": f"Flag/{flag_id('new')}", "ifMatch": 'W/"0"'}
    assert entries["create"]["resource"]["id"] == flag_id("new")
    # A create made by hand (no version given) names version 0 too.
    assert _entry(Change("create", "x", _flag("x"), flag_id("x")))["request"]["ifMatch"] == 'W/"0"'


def test_a_flag_the_server_gave_no_version_is_never_written_blindly():
    (change,) = plan_writes([_flag("moved", "inactive")], [_flag("moved", fid="b")], RULES).changes
    assert change.version is None
    result = apply_plan(None, [change])  # nothing is sent: no client is needed
    (refused,) = result.refused
    assert refused["flag_id"] == "b" and "no meta.versionId" in refused["message"] and not result.written


def test_a_plan_decided_again_keeps_the_time_its_data_was_read():
    from datetime import datetime, timezone

    from leukofhir.write import Plan, _over_deleted

    read_at = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
    plan = Plan(plan_writes([_flag("new")], [], RULES).decisions, read_at)
    # No create among the refused ones: nothing to look up on a server.
    assert _over_deleted(None, plan, set()).read_at == read_at


def _authored_flag(pid: str, value: str) -> dict:
    return {
        "resourceType": "Flag", "meta": {"tag": [{"system": RULES.uris.tag_system, "code": RULES.uris.tag_code}]},
        "identifier": [{"system": RULES.uris.identifier_system, "value": value}], "status": "active",
        "code": {"text": "test"}, "subject": {"reference": f"Patient/{pid}"},
        "author": {"reference": RULES.uris.author},
    }


# The pure Flag diff (it ran with the server tests, in tests/integration/test_run.py, though it needs no server).
def test_plan_writes_creates_updates_withdraws_and_leaves_alone():
    def flag(value, status="active", text="t"):
        return {**_authored_flag("p", value), "status": status, "code": {"text": text}}

    existing = [{**flag("same"), "id": "1", "meta": {"versionId": "3", "tag": flag("x")["meta"]["tag"]}},
                {**flag("changed"), "id": "2"}, {**flag("gone"), "id": "3"},
                {**flag("gone-before", "entered-in-error"), "id": "4"}, {**flag("dup"), "id": "5"},
                {**flag("dup"), "id": "6"}]
    desired = [flag("same"), flag("changed", "inactive"), flag("new"), flag("retracted", "entered-in-error"),
               flag("dup")]
    plan = plan_writes(desired, existing, RULES)
    assert {(c.action, c.identifier, c.flag_id) for c in plan.changes} == {
        ("update", "changed", "2"), ("create", "new", flag_id("new")), ("withdraw", "gone", "3"),
        ("delete", "dup", "6")}
    assert plan.unchanged == 3 and plan.not_created == 1  # same, gone-before, dup (kept one); retracted
    (withdrawn,) = [c.flag for c in plan.changes if c.action == "withdraw"]
    assert withdrawn["status"] == "entered-in-error" and "withdrawn" in withdrawn["code"]["text"]
    assert "id" not in withdrawn
    assert [c.flag_id for c in plan.changes if c.action == "delete"] == ["6"]  # the first by id is kept
