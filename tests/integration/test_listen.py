"""`leukofhir listen` as a process, against a real Airflow 3 api-server holding the repository's DAGs: secret,
debounce, bursts, outages, windows for notifications without payload.

The notifications are sent as HAPI sends them (PUT {endpoint}/Observation/{id} with the resource, the secret
in a header); test_fhir_subscriptions.py shows HAPI sending exactly that, and the last tests here start from
the real HAPI server. No scheduler runs here: Airflow validates each run's conf against the real DAG's Params
and the runs stay queued, so these tests read back what the receiver asked for (tests/e2e/test_realtime.py runs
them to the Flags)."""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import jwt
import pytest
import requests
from conftest import ROOT

from leukofhir.config import load_config
from leukofhir.realtime.airflow_api import AirflowClient, AirflowError, AirflowSettings
from leukofhir.realtime.listen import DAG_ID, WINDOW_DAG_ID
from leukofhir.realtime.secret import authorization_header
from leukofhir.realtime.subscribe import build_subscription, subscribe, subscription_specs, unsubscribe
from support.airflow_server import USER, LocalAirflow
from support.faultproxy import Fault, FaultProxy
from support.fhir_builders import observation, patient
from support.listen_process import ListenProcess
from support.ports import session_port

pytestmark = pytest.mark.airflow_server

SECRET = "listen-test-secret-0123456789"


@pytest.fixture(scope="module")
def airflow_api(tmp_path_factory):
    with LocalAirflow(
        tmp_path_factory.mktemp("airflow"), session_port(2), dags_folder=ROOT / "dags", scheduler=False
    ) as airflow:
        yield airflow


@pytest.fixture
def listen_env(airflow_api):
    return dict(os.environ, LEUKOFHIR_HOOK_SECRET=SECRET, **airflow_api.receiver_environment())


def _runs_with(airflow: LocalAirflow, patients: set[str]) -> list[dict]:
    """The runs of leukopenia_patients holding any of `patients`, read back through the REST API."""
    return [r for r in airflow.runs(DAG_ID) if set((r.get("conf") or {}).get("patients", [])) & patients]


def _notify(listener: ListenProcess, resource: dict, secret: str | None = SECRET, session=requests) -> int:
    headers = {"Content-Type": "application/fhir+json; charset=UTF-8"}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    url = f"{listener.url}/notify/{resource['resourceType']}/{resource['id']}"
    return session.put(url, data=json.dumps(resource), headers=headers, timeout=30).status_code


def _assert_each_once(runs: list[dict], patients: set[str]) -> None:
    seen = [p for r in runs for p in r["conf"]["patients"]]
    assert sorted(seen) == sorted(patients), "every patient in exactly one run"


def test_the_secret_is_checked(listen_env, airflow_api, tmp_path, unique):
    with ListenProcess(tmp_path, session_port(3), listen_env) as listener:
        refused = observation(f"r-{unique}", "wbc", 1.0, patient=f"Patient/refused-{unique}")
        assert _notify(listener, refused, secret=None) == 401
        assert _notify(listener, refused, secret="wrong-secret-0123456789") == 401
        assert _notify(listener, refused, secret=SECRET + "x") == 401
        assert _notify(listener, refused, secret=SECRET[:-1]) == 401
        r = requests.post(f"{listener.url}/notify", headers={"Authorization": "Basic " + SECRET}, timeout=10)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert listener.health()["pending_patients"] == 0  # nothing refused was queued

        accepted = observation(f"a-{unique}", "wbc", 1.0, patient=f"Patient/ok-{unique}")
        assert _notify(listener, accepted) == 200
        listener.wait_drained()
    runs = _runs_with(airflow_api, {f"Patient/ok-{unique}", f"Patient/refused-{unique}"})
    assert [r["conf"] for r in runs] == [{"patients": [f"Patient/ok-{unique}"]}]
    assert "refused" in listener.log.read_text()


def test_debounce_collapses_a_panel_into_one_run(listen_env, airflow_api, tmp_path, unique):
    pid = f"Patient/cbc-{unique}"
    marker = f"SENSITIVE-{unique}"  # resource content: must reach neither the log nor the run
    # Ids as a FHIR server makes them ([A-Za-z0-9-.]: no underscore); the receiver refuses any other with a 400.
    panel = [
        observation(f"{concept.replace('_', '-')}-{unique}", concept, 1.0, patient=pid, note=[{"text": marker}])
        for concept in ("wbc", "anc", "neutrophils_pct", "lymphocytes_abs", "hemoglobin", "platelets")
    ]
    with ListenProcess(tmp_path, session_port(3), listen_env) as listener:
        with requests.Session() as session:
            assert [_notify(listener, o, session=session) for o in panel] == [200] * len(panel)
        health = listener.wait_drained()
        assert health["runs_created"] == 1
    runs = _runs_with(airflow_api, {pid})
    assert len(runs) == 1
    run = runs[0]
    assert run["conf"] == {"patients": [pid]}  # references only
    assert run["dag_run_id"].startswith("leukofhir_realtime__") and run["logical_date"] is None
    assert run["run_type"] == "manual" and run["triggering_user_name"] == USER
    log = listener.log.read_text()
    assert marker not in log and marker not in json.dumps(run)
    assert pid in log  # ids are what the log may name


def test_a_burst_for_100_patients_gives_few_runs_with_each_patient_once(listen_env, airflow_api, tmp_path, unique):
    patients = {f"Patient/b{i:03d}-{unique}" for i in range(100)}
    resources = [
        observation(f"{kind}{i:03d}-{unique}", kind, 1.0, patient=f"Patient/b{i:03d}-{unique}")
        for i in range(100)
        for kind in ("wbc", "anc")
    ]
    max_wait = 4.0
    with ListenProcess(tmp_path, session_port(3), listen_env) as listener:
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool, requests.Session() as session:
            statuses = list(pool.map(lambda r: _notify(listener, r, session=session), resources))
        burst = time.monotonic() - started
        assert statuses == [200] * len(resources)
        health = listener.wait_drained()
    runs = _runs_with(airflow_api, patients)
    _assert_each_once(runs, patients)
    # While notifications keep coming a batch forms at most every max_wait seconds, plus the last one.
    assert 1 <= len(runs) <= math.floor(burst / max_wait) + 2, (len(runs), burst)
    assert health["runs_created"] == len(runs)


def test_airflow_down_then_up_loses_nothing(listen_env, airflow_api, tmp_path, unique):
    before = f"Patient/z-{unique}"
    during = {f"Patient/d{i:02d}-{unique}" for i in range(30)}
    with ListenProcess(tmp_path, session_port(3), listen_env) as listener:
        assert _notify(listener, observation(f"z-{unique}", "wbc", 1.0, patient=before)) == 200
        listener.wait_drained()  # the receiver now holds a token
        airflow_api.stop()
        try:
            # It comes back signing with another key: the receiver's token is refused and replaced.
            airflow_api.rotate_jwt_secret()
            for p in sorted(during):
                assert _notify(listener, observation(f"o-{p[8:]}", "wbc", 1.0, patient=p)) == 200
            health = listener.wait_until(lambda h: h["trigger_failures"] >= 2)
            assert health["pending_patients"] + health["patients_in_unaccepted_batches"] == len(during)
        finally:
            airflow_api.start()
        health = listener.wait_drained()
    _assert_each_once(_runs_with(airflow_api, during | {before}), during | {before})
    assert health["runs_created"] >= 2
    assert "Airflow refused the token (HTTP 403: Invalid JWT token): logging in again" in listener.log.read_text()


def test_a_restarted_receiver_keeps_its_queue(listen_env, airflow_api, tmp_path, unique):
    first = {f"Patient/q{i:02d}-{unique}" for i in range(20)}
    second = {f"Patient/r{i:02d}-{unique}" for i in range(5)}
    away = dict(listen_env, LEUKOFHIR_AIRFLOW_URL="http://127.0.0.1:9")  # nothing listens there
    with ListenProcess(tmp_path, session_port(3), away) as listener:
        for p in sorted(first):
            assert _notify(listener, observation(f"o-{p[8:]}", "wbc", 1.0, patient=p)) == 200
        health = listener.wait_until(lambda h: h["trigger_failures"] >= 1)
        assert health["pending_patients"] + health["patients_in_unaccepted_batches"] == len(first)
    # Stopped with every patient still waiting; the next receiver on the same queue file sends them.
    with ListenProcess(tmp_path, session_port(3), listen_env) as listener:
        for p in sorted(second):
            assert _notify(listener, observation(f"o-{p[8:]}", "wbc", 1.0, patient=p)) == 200
        listener.wait_drained()
    _assert_each_once(_runs_with(airflow_api, first | second), first | second)


def test_a_lost_answer_does_not_start_a_second_run(airflow_api, tmp_path, unique):
    patients = {f"Patient/l{i}-{unique}" for i in range(3)}
    with FaultProxy(airflow_api.url) as proxy:
        env = dict(
            os.environ,
            LEUKOFHIR_HOOK_SECRET=SECRET,
            **dict(airflow_api.receiver_environment(), LEUKOFHIR_AIRFLOW_URL=proxy.base_url),
        )
        # Airflow creates the run, and the answer never reaches the receiver: it tries again with the same id.
        proxy.add(Fault("drop", method="POST", path_regex=r"/dagRuns$"))
        with ListenProcess(tmp_path, session_port(3), env) as listener:
            for p in sorted(patients):
                assert _notify(listener, observation(f"o-{p[8:]}", "wbc", 1.0, patient=p)) == 200
            health = listener.wait_drained()
        posts = [r for r in proxy.requests if r[0] == "POST" and r[1].endswith("/dagRuns")]
    assert len(posts) == 2
    assert (health["runs_created"], health["runs_existing"]) == (0, 1)  # the second try answered 409
    runs = _runs_with(airflow_api, patients)
    assert len(runs) == 1
    _assert_each_once(runs, patients)


def _status_with_token(server: LocalAirflow, token: str) -> int:
    return requests.get(
        f"{server.url}/api/v2/dags/{DAG_ID}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).status_code


def test_a_refused_token_is_replaced_once(airflow_api, unique):
    client = AirflowClient(AirflowSettings(airflow_api.url, USER, airflow_api.passwords[USER]))
    conf = {"patients": [f"Patient/t-{unique}"]}
    try:
        # Airflow 3.3: a token it cannot verify (another signing key) is 403 "Invalid JWT token" ...
        assert _status_with_token(airflow_api, "not-a-token") == 403
        client._token = "not-a-token"
        assert client.trigger_dag_run(DAG_ID, f"token-{unique}", conf) == "created"
        good = client._token
        assert good != "not-a-token"
        # ... and an expired one is 401 "Token Expired" (this one signed with the server's own key).
        claims = jwt.decode(good, options={"verify_signature": False})
        expired = jwt.encode(
            dict(claims, exp=int(time.time()) - 3600),
            airflow_api.env["AIRFLOW__API_AUTH__JWT_SECRET"],
            algorithm="HS512",
        )
        assert _status_with_token(airflow_api, expired) == 401
        client._token = expired
        assert client.trigger_dag_run(DAG_ID, f"token-{unique}", conf) == "exists"  # same run id: 409
        assert client._token not in (expired, None)
    finally:
        client.close()
    # Wrong credentials are an error after one try, not a loop.
    bad = AirflowClient(AirflowSettings(airflow_api.url, USER, "wrong-password"))
    with pytest.raises(AirflowError) as refused:
        bad.trigger_dag_run(DAG_ID, f"token2-{unique}", conf)
    assert refused.value.status == 401
    bad.close()


@pytest.mark.fhir
def test_from_the_fhir_server_to_an_airflow_run(listen_env, airflow_api, fhir_base_url, fhir_client, tmp_path, unique):
    """HAPI's Subscription → listen → Airflow: a CBC panel written in one transaction gives one run for its
    patient; deleting one of its results gives another (the patient found from the deleted version)."""
    rules = load_config()
    pid = f"chain-{unique}"
    fhir_client.update(patient(pid))
    with ListenProcess(tmp_path, session_port(3), listen_env, fhir_url=fhir_base_url) as listener:
        subscribe(fhir_client, f"{listener.url}/notify", SECRET, rules)
        try:
            panel = [
                observation(f"{c.replace('_', '-')}-{unique}", c, 1.0, patient=f"Patient/{pid}")
                for c in ("wbc", "anc", "lymphocytes_abs", "hemoglobin", "platelets")
            ]
            fhir_client.transaction(
                [{"resource": o, "request": {"method": "PUT", "url": f"Observation/{o['id']}"}} for o in panel]
            )
            listener.wait_until(lambda h: h["runs_created"] >= 1)
            listener.wait_drained()
            runs = _runs_with(airflow_api, {f"Patient/{pid}"})
            assert [r["conf"] for r in runs] == [{"patients": [f"Patient/{pid}"]}]

            fhir_client.request("DELETE", f"Observation/wbc-{unique}")
            listener.wait_until(lambda h: h["runs_created"] >= 2)
            assert len(_runs_with(airflow_api, {f"Patient/{pid}"})) == 2
        finally:
            unsubscribe(fhir_client, rules)


def _window_runs(airflow: LocalAirflow, after: str) -> list[dict]:
    """The receiver's window runs of the surveillance DAG whose window ends after `after` (ISO 8601)."""
    return [
        r
        for r in airflow.runs(WINDOW_DAG_ID)
        if r["dag_run_id"].startswith("leukofhir_realtime_window__") and r["conf"]["end"] > after
    ]


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_notifications_without_payload_start_one_surveillance_window(listen_env, airflow_api, tmp_path):
    before = datetime.now(timezone.utc)
    with ListenProcess(tmp_path, session_port(3), listen_env) as listener:
        for _ in range(3):  # what HAPI sends for a Subscription without payload
            answer = requests.post(f"{listener.url}/notify", headers={"Authorization": f"Bearer {SECRET}"}, timeout=10)
            assert answer.status_code == 200
        health = listener.wait_drained()
    after = datetime.now(timezone.utc)
    assert health["runs_created"] == 1
    (run,) = _window_runs(airflow_api, before.isoformat())
    start, end = _instant(run["conf"]["start"]), _instant(run["conf"]["end"])
    # Five minutes (the default look-back) before the first notification, to when the batch formed.
    assert before - timedelta(seconds=301) <= start <= after - timedelta(seconds=299)
    assert before <= end <= after
    assert run["run_type"] == "manual" and run["logical_date"] is None


@pytest.mark.fhir
def test_a_subscription_without_payload_gives_a_window_that_holds_the_change(
    listen_env, airflow_api, fhir_base_url, fhir_client, tmp_path, unique
):
    rules = load_config()
    pid = f"nopayload-{unique}"
    fhir_client.update(patient(pid))
    with ListenProcess(tmp_path, session_port(3), listen_env, fhir_url=fhir_base_url) as listener:
        subscription = build_subscription(subscription_specs(rules)[0], f"{listener.url}/notify", SECRET, rules)
        del subscription["channel"]["payload"]  # R4: no payload, "just a notification" (an empty POST)
        assert subscription["channel"]["header"] == [authorization_header(SECRET)]
        created = fhir_client.request("POST", "Subscription", json=subscription).json()
        try:
            deadline = time.monotonic() + 30
            while fhir_client.read("Subscription", created["id"])["status"] != "active":
                assert time.monotonic() < deadline, "the Subscription was not activated"
                time.sleep(0.3)
            written = fhir_client.update(observation(f"np-{unique}", "wbc", 1.0, patient=f"Patient/{pid}"))
            changed = _instant(written["meta"]["lastUpdated"])
            listener.wait_until(lambda h: h["runs_created"] >= 1)
        finally:
            unsubscribe(fhir_client, rules)
    (run,) = [r for r in _window_runs(airflow_api, changed.isoformat()) if _instant(r["conf"]["start"]) <= changed]
    assert _instant(run["conf"]["start"]) <= changed < _instant(run["conf"]["end"])
    log = listener.log.read_text()
    assert "notification without payload" in log and "PUT Observation" not in log  # HAPI named nothing
