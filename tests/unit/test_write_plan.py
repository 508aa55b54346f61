"""Planning Flag writes, without a server: every write names the version it was decided from."""

from __future__ import annotations

from leukofhir.config import load_config
from leukofhir.write.flags import NEW, Change, _entry, apply_plan, flag_id, plan_writes, withdrawn

RULES = load_config()


def _flag(
    value: str, status: str = "active", *, version: str | None = None, fid: str | None = None, patient: str = "p1"
) -> dict:
    flag = {
        "resourceType": "Flag",
        "meta": {"tag": [{"system": RULES.uris.tag_system, "code": RULES.uris.tag_code}]},
        "identifier": [{"system": RULES.uris.identifier_system, "value": value}],
        "status": status,
        "code": {"text": "t"},
        "subject": {"reference": f"Patient/{patient}"},
    }
    if version is not None:
        flag["meta"]["versionId"] = version
    if fid is not None:
        flag["id"] = fid
    return flag


def test_each_decision_names_the_version_and_the_patient_it_was_decided_from():
    existing = [
        _flag("same", version="4", fid="a"),
        _flag("moved", version="7", fid="b"),
        _flag("gone", version="2", fid="c", patient="p2"),
        _flag("dup", version="1", fid="d"),
        _flag("dup", version="3", fid="e"),
    ]
    desired = [
        _flag("same"),
        _flag("moved", "inactive"),
        _flag("new", patient="p3"),
        _flag("dup"),
        _flag("never", "entered-in-error"),
    ]
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
    plan = plan_writes(
        [_flag("moved", "inactive"), _flag("new")],
        [
            _flag("moved", version="7", fid="b"),
            _flag("gone", version="2", fid="c"),
            _flag("moved", version="9", fid="z"),
        ],
        RULES,
    )
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

    from leukofhir.write.flags import Plan, _over_deleted

    read_at = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
    plan = Plan(plan_writes([_flag("new")], [], RULES).decisions, read_at)
    # No create among the refused ones: nothing to look up on a server.
    assert _over_deleted(None, plan, set()).read_at == read_at


def _authored_flag(pid: str, value: str) -> dict:
    return {
        "resourceType": "Flag",
        "meta": {"tag": [{"system": RULES.uris.tag_system, "code": RULES.uris.tag_code}]},
        "identifier": [{"system": RULES.uris.identifier_system, "value": value}],
        "status": "active",
        "code": {"text": "test"},
        "subject": {"reference": f"Patient/{pid}"},
        "author": {"reference": RULES.uris.author},
    }


# The pure Flag diff (it ran with the server tests, in tests/integration/test_run.py, though it needs no server).
def test_plan_writes_creates_updates_withdraws_and_leaves_alone():
    def flag(value, status="active", text="t"):
        return {**_authored_flag("p", value), "status": status, "code": {"text": text}}

    existing = [
        {**flag("same"), "id": "1", "meta": {"versionId": "3", "tag": flag("x")["meta"]["tag"]}},
        {**flag("changed"), "id": "2"},
        {**flag("gone"), "id": "3"},
        # As the write step withdrew it (profile, narrative): nothing more to write.
        {**withdrawn(flag("gone-before"), RULES), "id": "4"},
        {**flag("dup"), "id": "5"},
        {**flag("dup"), "id": "6"},
    ]
    desired = [
        flag("same"),
        flag("changed", "inactive"),
        flag("new"),
        flag("retracted", "entered-in-error"),
        flag("dup"),
    ]
    plan = plan_writes(desired, existing, RULES)
    assert {(c.action, c.identifier, c.flag_id) for c in plan.changes} == {
        ("update", "changed", "2"),
        ("create", "new", flag_id("new")),
        ("withdraw", "gone", "3"),
        ("delete", "dup", "6"),
    }
    assert plan.unchanged == 3 and plan.not_created == 1  # same, gone-before, dup (kept one); retracted
    (gone,) = [c.flag for c in plan.changes if c.action == "withdraw"]
    assert gone["status"] == "entered-in-error" and "withdrawn" in gone["code"]["text"]
    assert "id" not in gone
    assert [c.flag_id for c in plan.changes if c.action == "delete"] == ["6"]  # the first by id is kept


def test_a_flag_under_a_previous_base_is_rewritten_in_place_under_the_current_one(tmp_path):
    from leukofhir.evaluate.flag_resource import flag_text
    from leukofhir.write.flags import comparable, withdrawn
    from support.site_rules import rules_with_base

    old_base, new_base = "https://old.example/leukofhir", "https://fhir.hospital.example/leukofhir"
    (tmp_path / "old").mkdir()
    old = load_config(rules_with_base(tmp_path / "old", old_base))
    new = load_config(rules_with_base(tmp_path, new_base, [old_base]))

    def under(rules, value, status="active", **kw):
        flag = _flag(value, status, **kw)
        flag["meta"]["tag"] = [{"system": rules.uris.tag_system, "code": rules.uris.tag_code}]
        flag["identifier"][0]["system"] = rules.uris.identifier_system
        flag["extension"] = [{"url": rules.uris.ctcae_grade_extension, "valueInteger": 2}]
        flag["meta"]["profile"] = [rules.uris.flag_profile]
        flag["text"] = flag_text(flag, rules)
        return flag

    existing = [
        under(old, "kept", version="3", fid="a"),
        under(old, "gone", version="5", fid="b"),
        under(old, "was-withdrawn", "entered-in-error", version="2", fid="c"),
    ]
    plan = plan_writes([under(new, "kept")], existing, new)
    by_id = {d.flag_id: d for d in plan.decisions}
    assert {i: (d.action, d.version) for i, d in by_id.items()} == {
        "a": ("update", "3"),
        "b": ("withdraw", "5"),
        "c": ("update", "2"),
    }
    stale = ((old.uris.tag_system, "leukofhir"),)
    assert all(d.stale_tags == stale for d in plan.decisions)  # removed after the write ($meta-delete)
    for decision in plan.decisions:
        text = str(decision.flag)
        assert old_base not in text and new_base in text
        assert decision.flag["meta"]["profile"] == [new.uris.flag_profile]
    # Once rewritten (the old tag removed), nothing more to write.
    rewritten = [{**d.flag, "id": d.flag_id, "meta": {**d.flag["meta"], "versionId": "9"}} for d in plan.decisions]
    again = plan_writes([under(new, "kept")], rewritten, new)
    assert [d.action for d in again.decisions] == ["unchanged"] * 3 and not any(d.stale_tags for d in again.decisions)
    assert comparable(withdrawn(rewritten[1], new)) == comparable(rewritten[1])


def test_a_flag_written_before_it_had_a_profile_and_narrative_is_brought_up_to_date():
    from leukofhir.evaluate.flag_resource import flag_text

    bare = _flag("x", version="1", fid="a")
    wanted = {**_flag("x"), "meta": {**_flag("x")["meta"], "profile": [RULES.uris.flag_profile]}}
    wanted["text"] = flag_text(wanted, RULES)
    assert [d.action for d in plan_writes([wanted], [bare], RULES).decisions] == ["update"]
    withdrawn_bare = _flag("y", "entered-in-error", version="1", fid="b")
    (decision,) = plan_writes([], [withdrawn_bare], RULES).decisions
    assert decision.action == "update" and decision.flag["text"]["status"] == "generated"
