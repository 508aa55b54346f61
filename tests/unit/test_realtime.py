"""The near-real-time path without servers: Subscription specs, the secret, the durable queue, the receiver's
handling of one notification and the batching policy."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from datetime import datetime, timezone

import pytest
import yaml

from leukofhir.config import DEFAULT_PATH, load_config
from leukofhir.errors import UsageError
from leukofhir.realtime.listen import Answer, BatchPolicy, Dispatcher, InvalidReferenceError, Receiver, patient_of
from leukofhir.realtime.queue import PatientQueue
from leukofhir.realtime.secret import authorization_header, hook_secret, is_authorized
from leukofhir.realtime.subscribe import (
    SEND_DELETES_EXTENSION,
    SubscriptionError,
    build_subscription,
    check_endpoint,
    subscription_specs,
)
from support.fhir_builders import observation

SECRET = "unit-secret-0123456789abcdef"
# Airflow 3.3's default [scheduler] allowed_run_id_pattern.
AIRFLOW_RUN_ID = re.compile(r"^[A-Za-z0-9_.~:+-]+$")


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- subscribe -------------------------------------------------------------------------------------------


def test_specs_come_from_the_rules_file():
    rules = load_config()
    specs = {s.resource_type: s for s in subscription_specs(rules)}
    assert set(specs) == {"Observation", "MedicationStatement", "MedicationRequest", "MedicationAdministration"}
    tokens = specs["Observation"].criteria.removeprefix("Observation?code=").split(",")
    assert tokens == [f"http://loinc.org|{code}" for code in rules.code_to_concept]
    assert len(tokens) == 32 and "http://loinc.org|30405-5" not in tokens
    assert specs["MedicationStatement"].criteria == "MedicationStatement?"


def test_medication_kinds_follow_the_site_settings():
    rules = load_config()
    meds = rules.medications.model_copy(update={"include_requests": False, "include_administrations": False})
    kinds = [s.resource_type for s in subscription_specs(rules.model_copy(update={"medications": meds}))]
    assert kinds == ["Observation", "MedicationStatement"]


def test_a_criteria_too_long_for_servers_is_refused(tmp_path):
    data = yaml.safe_load(DEFAULT_PATH.read_text(encoding="utf-8"))
    data["observations"]["concepts"]["wbc"]["codes"] += [f"{90000 + i}-{i % 10}" for i in range(60)]
    site = tmp_path / "rules.yaml"
    site.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(SubscriptionError, match="more than 2000"):
        subscription_specs(load_config(site))


def test_the_subscription_resource():
    rules = load_config()
    spec = subscription_specs(rules)[0]
    sub = build_subscription(spec, "https://receiver.example/notify", SECRET, rules)
    assert sub["status"] == "requested" and sub["criteria"] == spec.criteria
    assert sub["meta"]["tag"] == [{"system": rules.uris.tag_system, "code": rules.uris.tag_code}]
    channel = sub["channel"]
    assert channel["type"] == "rest-hook" and channel["payload"] == "application/fhir+json"
    assert channel["endpoint"] == "https://receiver.example/notify"
    assert channel["header"] == [f"Authorization: Bearer {SECRET}"]
    assert channel["extension"] == [{"url": SEND_DELETES_EXTENSION, "valueBoolean": True}]


@pytest.mark.parametrize(
    "endpoint", ["ftp://x/notify", "/notify", "http:///notify", "http://h/notify?a=1", "http://h/notify#f"]
)
def test_unusable_endpoints_are_refused(endpoint):
    with pytest.raises(UsageError):
        check_endpoint(endpoint)


def test_plain_http_off_loopback_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        assert check_endpoint("http://127.0.0.1:8089/notify/") == "http://127.0.0.1:8089/notify"
        assert check_endpoint("https://receiver.example/notify") == "https://receiver.example/notify"
        assert not caplog.records
        check_endpoint("http://receiver.example/notify")
    assert "unencrypted" in caplog.text


# --- the secret ------------------------------------------------------------------------------------------


def test_secret_from_environment_or_file(tmp_path):
    assert hook_secret({"LEUKOFHIR_HOOK_SECRET": SECRET}) == SECRET
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    assert hook_secret({"LEUKOFHIR_HOOK_SECRET_FILE": str(path)}) == SECRET
    with pytest.raises(UsageError, match="LEUKOFHIR_HOOK_SECRET"):
        hook_secret({})
    with pytest.raises(UsageError, match="at least 16"):
        hook_secret({"LEUKOFHIR_HOOK_SECRET": "short"})
    with pytest.raises(UsageError, match="without spaces"):
        hook_secret({"LEUKOFHIR_HOOK_SECRET": "a secret with spaces in it"})


def test_authorization_is_the_exact_bearer_secret():
    assert authorization_header(SECRET) == f"Authorization: Bearer {SECRET}"
    assert is_authorized(f"Bearer {SECRET}", SECRET)
    for wrong in (
        None,
        "",
        SECRET,
        f"Bearer {SECRET[:-1]}",
        f"Bearer {SECRET}x",
        f"bearer {SECRET}",
        f"Basic {SECRET}",
        "Bearer ünïcode",
    ):
        assert not is_authorized(wrong, SECRET), wrong


# --- the queue -------------------------------------------------------------------------------------------


def test_queue_keeps_each_patient_once_and_survives_a_reopen(tmp_path):
    clock = Clock()
    q = PatientQueue(tmp_path / "q.sqlite3", clock=clock)
    q.add(["Patient/a", "Patient/b"])
    clock.now += 1.5
    q.add(["Patient/a"])  # a second result of the same panel
    state = q.pending_state()
    assert (state.count, state.first_seen, state.last_seen) == (2, clock.now - 1.5, clock.now)
    q.close()

    q = PatientQueue(tmp_path / "q.sqlite3", clock=clock)
    assert q.counts() == {
        "pending_patients": 2,
        "unaccepted_batches": 0,
        "patients_in_unaccepted_batches": 0,
        "pending_window_requests": 0,
    }
    batch = q.form_batch(10, "leukofhir_realtime")
    assert batch.patients == ["Patient/a", "Patient/b"] and AIRFLOW_RUN_ID.match(batch.run_id)
    assert q.form_batch(10, "leukofhir_realtime") is None
    q.close()

    q = PatientQueue(tmp_path / "q.sqlite3", clock=clock)
    (again,) = q.due_batches()
    assert (again.run_id, again.patients) == (batch.run_id, batch.patients)  # same run id after a restart
    q.retry_later(again, 5)
    assert q.due_batches() == []
    clock.now += 5
    (later,) = q.due_batches()
    assert later.attempts == 1
    q.accepted(later)
    assert q.counts() == {
        "pending_patients": 0,
        "unaccepted_batches": 0,
        "patients_in_unaccepted_batches": 0,
        "pending_window_requests": 0,
    }


def test_window_batches_follow_each_other_and_look_back_a_bounded_time(tmp_path):
    clock = Clock()
    q = PatientQueue(tmp_path / "q.sqlite3", clock=clock)
    assert q.form_window_batch(300, "w") is None
    q.add_window_request()
    first_seen = clock.now
    clock.now += 3
    q.add_window_request()
    assert q.window_state().first_seen == first_seen and q.window_state().last_seen == clock.now
    first = q.form_window_batch(300, "w")
    assert first.patients == [] and first.window == (iso(first_seen - 300), iso(clock.now))
    assert q.counts()["pending_window_requests"] == 0

    clock.now += 60  # the next window starts where the first ended: nothing is read twice
    q.add_window_request()
    clock.now += 2
    q.close()
    q = PatientQueue(tmp_path / "q.sqlite3", clock=clock)  # kept across a restart
    second = q.form_window_batch(300, "w")
    assert second.window == (first.window[1], iso(clock.now)) and second.run_id != first.run_id

    clock.now += 86400  # but never further back than the look-back before its first notification
    q.add_window_request()
    third = q.form_window_batch(300, "w")
    assert third.window == (iso(clock.now - 300), iso(clock.now))
    assert [b.window for b in q.due_batches()] == [first.window, second.window, third.window]
    q.close()


def test_a_queue_file_of_the_first_version_is_upgraded(tmp_path):
    path = tmp_path / "q.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript("""CREATE TABLE batch (seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL UNIQUE,
            created REAL NOT NULL, patients TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NOT NULL);
            INSERT INTO batch (run_id, created, patients, next_attempt) VALUES ('r1', 0, '["Patient/a"]', 0);""")
    db.close()
    q = PatientQueue(path, clock=Clock())
    (batch,) = q.due_batches()
    assert (batch.run_id, batch.patients, batch.window) == ("r1", ["Patient/a"], None)
    q.close()


def test_batches_are_bounded_and_run_ids_unique(tmp_path):
    q = PatientQueue(tmp_path / "q.sqlite3", clock=Clock())
    q.add([f"Patient/{i:03d}" for i in range(25)])
    batches = [q.form_batch(10, "leukofhir_realtime") for _ in range(3)]
    assert [len(b.patients) for b in batches] == [10, 10, 5]
    assert sorted(p for b in batches for p in b.patients) == [f"Patient/{i:03d}" for i in range(25)]
    assert len({b.run_id for b in batches}) == 3


# --- the receiver ----------------------------------------------------------------------------------------


@pytest.fixture
def receiver(tmp_path):
    q = PatientQueue(tmp_path / "q.sqlite3", clock=Clock())
    yield Receiver(q, fhir=None, base_url="http://fhir.example/fhir")
    q.close()


def _queued(receiver) -> list[str]:
    batch = receiver.queue.form_batch(1000, "t")
    return batch.patients if batch else []


def test_a_put_queues_its_patient(receiver):
    obs = observation("o1", "wbc", 1.0, patient="http://fhir.example/fhir/Patient/p1/_history/3")
    assert receiver.handle("PUT", "notify/Observation/o1", json.dumps(obs).encode()).status == 200
    med = {"resourceType": "MedicationRequest", "id": "m1", "subject": {"reference": "Patient/p2"}}
    assert receiver.handle("PUT", "MedicationRequest/m1", json.dumps(med).encode()).status == 200
    assert _queued(receiver) == ["Patient/p1", "Patient/p2"]


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("notify/Patient/p1", {"resourceType": "Patient", "id": "p1"}, 404),
        ("notify/Observation/o1", {"resourceType": "Observation", "id": "other"}, 400),
        ("notify/Observation/o1", {"resourceType": "MedicationRequest", "id": "o1"}, 400),
        ("notify/Observation/o1", "not json", 400),
        ("o1", {"resourceType": "Observation", "id": "o1"}, 404),
    ],
)
def test_what_is_not_a_notification_of_ours_is_refused(receiver, path, body, status):
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    assert receiver.handle("PUT", path, raw).status == status
    assert _queued(receiver) == []


def test_nothing_to_evaluate_is_acknowledged_and_not_queued(receiver):
    for subject in (None, {"reference": "Group/g1"}, {"reference": "urn:uuid:abc"}, {"display": "no reference"}):
        obs = observation("o1", "wbc", 1.0)
        obs.pop("subject")
        if subject:
            obs["subject"] = subject
        assert receiver.handle("PUT", "notify/Observation/o1", json.dumps(obs).encode()).status == 200
    assert receiver.handle("DELETE", "notify/Observation/o1", b"").status == 200  # no FHIR server to ask
    assert _queued(receiver) == []
    assert receiver.queue.counts()["pending_window_requests"] == 0


@pytest.mark.parametrize(
    "reference, reason",
    [
        ("Patient/a b", "'a b' is not a valid FHIR id"),  # the DAG's Param would refuse the run, and hold its batch
        ("Patient/..", "'..' is not a valid FHIR id"),
        ("Patient/.", "'.' is not a valid FHIR id"),
        ("Patient/x?_id=y", "is not a valid FHIR id"),
        ("https://other.example/fhir/Patient/p", "a Patient of another server than http://fhir.example/fhir/"),
        ("http://fhir.example/fhirx/Patient/p", "another server"),
    ],
)
def test_a_subject_that_is_no_patient_of_this_server_is_refused(receiver, reference, reason):
    obs = observation("o2", "wbc", 1.0, patient=reference)
    answer = receiver.handle("PUT", "notify/Observation/o2", json.dumps(obs).encode())
    assert answer.status == 400 and answer.detail.startswith("Observation/o2: subject ") and reason in answer.detail
    assert _queued(receiver) == []


@pytest.mark.parametrize(
    "raw_id", [".", "..", "%2E%2E", "%2e", "x%3F_id%3Dvictim", "x%23y", "a%2Fb", "x%0Ay", "", "a" * 65]
)
def test_an_id_that_could_change_a_url_is_refused_before_any_request(raw_id, tmp_path):
    q = PatientQueue(tmp_path / "q.sqlite3")
    receiver = Receiver(q, fhir=None, base_url="http://fhir.example/fhir")
    receiver._last_version = lambda ref: pytest.fail(f"a request was made for {ref!r}")
    for method in ("PUT", "DELETE"):
        answer = receiver.handle(method, f"/notify/Observation/{raw_id}", b"{}")
        if raw_id:
            assert answer.status == 400 and "not a valid FHIR id" in answer.detail, (method, raw_id, answer)
        else:
            assert answer.status == 404  # no id at all: not a notification of ours
    q.close()


def test_a_body_nested_too_deep_is_a_400(receiver):
    deep = b'{"resourceType": "Observation", "id": "o1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = receiver.handle("PUT", "/notify/Observation/o1", deep)
    assert answer == Answer(400, "Observation/o1: the body nests deeper than 64 levels")
    shallow_but_over = b'{"resourceType": "Observation", "id": "o1", "x": ' + b"[" * 70 + b"]" * 70 + b"}"
    assert receiver.handle("PUT", "/notify/Observation/o1", shallow_but_over).status == 400


def test_a_notification_without_payload_asks_for_a_window(receiver):
    assert receiver.handle("POST", "notify", b"").status == 200
    assert receiver.handle("POST", "notify", b"  ").status == 200
    assert receiver.empty_posts == 2
    assert _queued(receiver) == []
    assert receiver.queue.counts()["pending_window_requests"] == 1  # one window for both


def test_patient_of():
    base = "https://fhir.example/r4/"
    assert patient_of({"subject": {"reference": "Patient/1"}}, base) == "Patient/1"
    assert patient_of({"subject": {"reference": "https://fhir.example/r4/Patient/1/_history/2"}}, base) == "Patient/1"
    assert patient_of({"subject": {"reference": "Location/1"}}, base) is None
    assert patient_of({"subject": {"reference": "urn:uuid:1"}}, base) is None
    assert patient_of({}, base) is None
    for reference in ("Patient/x?_id=y", "Patient/..", "https://fhir.example/r4x/Patient/1"):
        with pytest.raises(InvalidReferenceError):
            patient_of({"subject": {"reference": reference}}, base)


# --- the batching policy ---------------------------------------------------------------------------------


def test_a_batch_forms_after_a_quiet_spell_or_the_longest_wait(tmp_path):
    clock = Clock()
    q = PatientQueue(tmp_path / "q.sqlite3", clock=clock)
    d = Dispatcher(q, airflow=None, policy=BatchPolicy(debounce=2, max_wait=10, max_patients=100), clock=clock)
    assert not d._batch_due()
    q.add(["Patient/a"])
    clock.now += 1.9
    assert not d._batch_due()  # the rest of a panel may still be arriving
    clock.now += 0.2
    assert d._batch_due()
    q.form_batch(100, "t")

    # A steady stream, a new patient every 1.9 s, is never quiet for 2 s: max_wait bounds the wait.
    for i in range(6):
        q.add([f"Patient/s{i}"])
        assert not d._batch_due(), i
        clock.now += 1.9
    assert d._batch_due()  # the first of them has waited 11.4 s > 10
    q.close()


def test_a_batch_forms_at_once_when_max_patients_wait(tmp_path):
    clock = Clock()
    q = PatientQueue(tmp_path / "q.sqlite3", clock=clock)
    d = Dispatcher(q, airflow=None, policy=BatchPolicy(debounce=2, max_wait=10, max_patients=3), clock=clock)
    q.add(["Patient/x", "Patient/y"])
    assert not d._batch_due()
    q.add(["Patient/z"])
    assert d._batch_due()
    q.close()


def test_a_window_batch_forms_after_a_quiet_spell_of_empty_notifications(tmp_path):
    clock = Clock()
    q = PatientQueue(tmp_path / "q.sqlite3", clock=clock)
    d = Dispatcher(q, airflow=None, policy=BatchPolicy(debounce=1, max_wait=5), clock=clock)
    assert not d._due(q.window_state())
    q.add_window_request()
    clock.now += 0.9
    assert not d._due(q.window_state()) and not d._batch_due()  # patients and windows are apart
    clock.now += 0.2
    assert d._due(q.window_state())
    q.close()


def test_a_base_url_without_its_slash_claims_no_other_servers_patients():
    from leukofhir.extract.search import local_patient_id

    for base in ("https://fhir.example/r4", "https://fhir.example/r4/"):
        assert local_patient_id("https://fhir.example/r4/Patient/1", base) == "1"
        assert local_patient_id("https://fhir.example/r4x/Patient/1", base) is None
        assert local_patient_id("https://fhir.example/r4-other/Patient/1", base) is None
        assert local_patient_id("Patient/1", base) == "1"
