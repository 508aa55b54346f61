"""`leukofhir cds-hooks` over real HTTP, as its own process, against the real HAPI server: discovery, patient-view and
order-sign with and without prefetch, the EHR's JWT, and cards that agree with the Flags a run writes."""

from __future__ import annotations

import gzip
import json
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

import jwt
import pytest
import requests

from leukofhir.cds.cards import CARD_NAMESPACE
from leukofhir.cds.fetch import prefetch_templates
from leukofhir.config import load_config
from leukofhir.extract.search import iter_history
from leukofhir.run import run_pipeline
from leukofhir.write.load import load_files
from support.cds_process import (
    ORDER_SIGN,
    PATIENT_VIEW,
    CdsProcess,
    EhrKeys,
    draft_order,
    order_sign_request,
    patient_view_request,
)
from support.fhir_builders import days_ago, observation, patient, statement
from support.ports import session_port
from support.server_data import put, rules_with_own_tag

RULES = load_config()
SAMPLE = Path(__file__).resolve().parents[2] / "leukofhir" / "sample_data"
CLOZAPINE, AMOXICILLIN = "2626", "723"

SANDBOX = "https://sandbox.cds-hooks.org"

pytestmark = pytest.mark.fhir


@pytest.fixture(scope="module")
def cds(fhir_base_url, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cds")
    keys = EhrKeys(folder)
    with CdsProcess(folder, session_port(17), fhir_base_url, keys, args=("--cors-origin", SANDBOX)) as service:
        yield service


def _post(service, path: str, body: dict, headers: dict | None = None) -> requests.Response:
    headers = service.auth(path) if headers is None else headers
    return requests.post(service.url + path, json=body, headers=headers, timeout=60)


def _agranulocytosis_patient(client, unique: str, *, drug: str | None = None) -> str:
    """A patient with ANC 0.3 three days ago (agranulocytosis, open) on the server."""
    pid = f"cds-{unique}"
    ref = f"Patient/{pid}"
    resources = [
        patient(pid),
        observation(f"{pid}-anc1", "anc", 2.4, time=days_ago(40), patient=ref),
        observation(f"{pid}-anc2", "anc", 0.3, time=days_ago(3), patient=ref),
    ]
    if drug:
        resources.append(statement(f"{pid}-med", drug, start=days_ago(30), patient_ref=ref))
    put(client, *resources)
    return pid


def _prefetch(client, pid: str) -> dict:
    """What an EHR would prefetch with the discovery document's templates, read from the server."""
    templates = prefetch_templates(RULES)
    resources = list(iter_history(client, [pid], RULES))
    prefetch = {}
    for key, template in templates.items():
        kind = template.split("?", 1)[0].split("/", 1)[0]
        matching = [
            r
            for r in resources
            if r["resourceType"] == kind or (kind == "Observation" and r["resourceType"] == "DiagnosticReport")
        ]
        prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in matching]}
    prefetch["patient"] = next(r for r in resources if r["resourceType"] == "Patient")
    return prefetch


def test_discovery_lists_both_services_with_their_prefetch(cds):
    answer = requests.get(cds.url + "/cds-services", timeout=10)
    assert answer.status_code == 200
    services = {s["id"]: s for s in answer.json()["services"]}
    assert {k: s["hook"] for k, s in services.items()} == {
        "leukopenia-patient-view": "patient-view",
        "leukopenia-order-sign": "order-sign",
    }
    prefetch = services["leukopenia-patient-view"]["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    assert "751-8" in prefetch["observations"] and "{{context.patientId}}" in prefetch["observations"]
    assert prefetch["flags"].startswith("Flag?subject=Patient/{{context.patientId}}&_tag=")


def test_the_configured_browser_origin_may_call_it_and_no_other(cds):
    for origin, allowed in ((SANDBOX, True), ("https://evil.example", False)):
        preflight = requests.options(
            cds.url + PATIENT_VIEW,
            timeout=10,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert (preflight.headers.get("Access-Control-Allow-Origin") == origin) is allowed, preflight.headers
        discovery = requests.get(cds.url + "/cds-services", headers={"Origin": origin}, timeout=10)
        assert (discovery.headers.get("Access-Control-Allow-Origin") == origin) is allowed


def test_patient_view_with_prefetch_gives_a_critical_card(cds, fhir_client, unique):
    pid = _agranulocytosis_patient(fhir_client, unique, drug="clozapine 100 mg")
    answer = _post(cds, PATIENT_VIEW, patient_view_request(pid, _prefetch(fhir_client, pid)))
    assert answer.status_code == 200, answer.text
    (card,) = answer.json()["cards"]
    assert card["indicator"] == "critical"
    assert card["summary"].startswith("Agranulocytosis: ANC 0.3 ×10^9/L on ") and card["summary"].endswith("grade 4")
    assert len(card["summary"]) < 140
    assert "clozapine" in card["detail"] and "| ANC | 0.3 ×10^9/L |" in card["detail"]
    assert card["source"]["label"] and card["source"]["url"].startswith("https://")
    assert "prefetched" in cds.log.read_text()


def test_patient_view_without_prefetch_reads_the_configured_server(cds, fhir_client, fhir_base_url, unique):
    pid = _agranulocytosis_patient(fhir_client, unique)
    for extra in (
        {},
        {"fhirServer": fhir_base_url},
        {
            "fhirServer": fhir_base_url + "/",
            "fhirAuthorization": {
                "access_token": "ehr-token-1",
                "token_type": "Bearer",
                "scope": "patient/*.read",
                "subject": "cds-service",
            },
        },
    ):
        answer = _post(cds, PATIENT_VIEW, patient_view_request(pid, **extra))
        assert answer.status_code == 200, answer.text
        assert [c["indicator"] for c in answer.json()["cards"]] == ["critical"]


def test_a_request_naming_another_fhir_server_is_refused(cds, fhir_client, unique):
    pid = _agranulocytosis_patient(fhir_client, unique)
    answer = _post(
        cds,
        PATIENT_VIEW,
        patient_view_request(
            pid, fhirServer="http://127.0.0.1:9/fhir", fhirAuthorization={"access_token": "t", "token_type": "Bearer"}
        ),
    )
    assert answer.status_code == 400
    assert "fhirServer" in answer.json()["detail"]


def test_no_counts_no_card_and_normal_counts_no_card(cds, fhir_client, unique):
    empty, normal = f"cds-empty-{unique}", f"cds-normal-{unique}"
    put(
        fhir_client,
        patient(empty),
        patient(normal),
        observation(f"{normal}-wbc", "wbc", 6.1, time=days_ago(2), patient=f"Patient/{normal}"),
    )
    for pid in (empty, normal, f"never-{unique}"):
        answer = _post(cds, PATIENT_VIEW, patient_view_request(pid))
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"cards": []}


@pytest.mark.parametrize(
    "case",
    ["missing", "not bearer", "other key", "wrong aud", "expired", "untrusted iss", "HS256", "no jti", "replayed"],
)
def test_a_bad_or_missing_jwt_is_a_401(cds, case, tmp_path):
    audience = cds.url + PATIENT_VIEW
    body = patient_view_request("nobody")
    stranger = EhrKeys(tmp_path)
    headers = {
        "missing": {},
        "not bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
        "other key": stranger.header(audience),  # same iss and kid, another key: the signature fails
        "wrong aud": cds.auth(ORDER_SIGN),
        "expired": cds.keys.header(audience, expires_in=-600),
        "untrusted iss": stranger.header(audience, issuer="https://other-ehr.example.org"),
        "HS256": {
            "Authorization": "Bearer "
            + jwt.encode(
                {"iss": cds.keys.issuer, "aud": audience, "jti": "x", "exp": 4102444800},
                "secret" * 8,
                algorithm="HS256",
                headers={"kid": "es"},
            )
        },
        "no jti": {
            "Authorization": "Bearer "
            + jwt.encode(
                {"iss": cds.keys.issuer, "aud": audience, "exp": 4102444800},
                cds.keys.keys["es"][0],
                algorithm="ES384",
                headers={"kid": "es"},
            )
        },
    }.get(case)
    if case == "replayed":
        headers = cds.auth(PATIENT_VIEW, jti=f"once-{uuid.uuid4().hex}")
        assert _post(cds, PATIENT_VIEW, body, headers).status_code == 200
    answer = _post(cds, PATIENT_VIEW, body, headers)
    assert answer.status_code == 401, answer.text
    assert answer.headers["WWW-Authenticate"] == "Bearer"


def test_both_signing_algorithms_are_accepted(cds):
    for kid in ("rs", "es"):
        answer = _post(cds, PATIENT_VIEW, patient_view_request("nobody"), cds.auth(PATIENT_VIEW, kid=kid))
        assert answer.status_code == 200, (kid, answer.text)


def test_order_sign_warns_for_clozapine_and_chemotherapy_not_for_an_unrelated_drug(cds, fhir_client, unique):
    pid = _agranulocytosis_patient(fhir_client, unique)
    orders = [
        draft_order("o-cloz", pid, rxnorm=CLOZAPINE, text="clozapine 25 MG Oral Tablet"),
        draft_order("o-cis", pid, text="Cisplatin 50 MG Injection"),
        draft_order("o-amox", pid, rxnorm=AMOXICILLIN, text="amoxicillin 500 MG Oral Capsule"),
    ]
    answer = _post(cds, ORDER_SIGN, order_sign_request(pid, orders))
    assert answer.status_code == 200, answer.text
    cards = answer.json()["cards"]
    assert len(cards) == 2
    clozapine, cisplatin = cards
    assert clozapine["summary"].startswith("Clozapine ordered: ANC 0.3 ×10^9/L on ")
    assert clozapine["indicator"] == "critical"
    assert "below the threshold 1.5" in clozapine["detail"] and "benign ethnic neutropenia 1" in clozapine["detail"]
    assert "Clozapine prescribing information" in clozapine["detail"]
    assert cisplatin["summary"].startswith("Antineoplastic chemotherapy ordered: ANC 0.3")
    assert "paclitaxel prescribing information" in cisplatin["detail"]
    assert all(c["overrideReasons"] for c in cards)


def test_order_sign_reads_a_contained_medication_by_atc(cds, fhir_client, unique):
    pid = _agranulocytosis_patient(fhir_client, unique)
    order = {
        "resourceType": "MedicationRequest",
        "id": "o-contained",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{pid}"},
        "medicationReference": {"reference": "#m1"},
        "contained": [
            {
                "resourceType": "Medication",
                "id": "m1",
                "code": {"coding": [{"system": "http://www.whocc.no/atc", "code": "L01XA01"}]},
            }
        ],
    }
    answer = _post(cds, ORDER_SIGN, order_sign_request(pid, [order]))
    assert answer.status_code == 200, answer.text
    (card,) = answer.json()["cards"]
    assert card["summary"].startswith("Antineoplastic chemotherapy ordered: ANC 0.3")


def test_order_sign_gives_no_card_when_the_counts_are_normal(cds, fhir_client, unique):
    pid = f"cds-ok-{unique}"
    put(fhir_client, patient(pid), observation(f"{pid}-anc", "anc", 3.2, time=days_ago(1), patient=f"Patient/{pid}"))
    orders = [draft_order("o1", pid, rxnorm=CLOZAPINE), draft_order("o2", pid, text="paclitaxel 6 MG/ML")]
    answer = _post(cds, ORDER_SIGN, order_sign_request(pid, orders))
    assert answer.status_code == 200 and answer.json() == {"cards": []}


UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _sample_copy(folder: Path, unique: str) -> tuple[Path, list[str]]:
    """The sample bundles under ids of their own (every resource id and reference made unique to the test): other
    tests of the session evaluate the sample patients as of now, and their Flags stand at the ids this test's run, as
    of 2021 and under its own tag, would write (a Flag's id derives from its identifier, not its tag)."""
    folder.mkdir()
    patients = []
    for path in SAMPLE.glob("*.json.gz"):
        data = UUID.sub(lambda m: m.group(0) + b"-" + unique[:8].encode(), gzip.decompress(path.read_bytes()))
        (folder / path.name).write_bytes(gzip.compress(data))
        patients += [
            e["resource"]["id"] for e in json.loads(data)["entry"] if e["resource"]["resourceType"] == "Patient"
        ]
    return folder, sorted(patients)


def _recent_patients(client, unique: str) -> list[str]:
    """Patients with counts of the last weeks, one per kind of card: agranulocytosis on clozapine (critical),
    leukopenia grade 3 (warning), lymphopenia grade 1 (info), recovered (no card), lapsed (no card)."""
    made = {}
    for name, rows in {
        "agran": [("anc", 2.1, 30), ("anc", 0.4, 2)],
        "leuko": [("wbc", 6.0, 30), ("wbc", 1.5, 4)],
        "lymph": [("lymphocytes_abs", 0.9, 5)],
        "recovered": [("wbc", 2.5, 20), ("wbc", 5.5, 3)],
        "lapsed": [("wbc", 2.5, 200)],
    }.items():
        pid = f"cds-{name}-{unique}"
        made[pid] = [patient(pid)] + [
            observation(f"{pid}-{i}", concept, value, time=days_ago(days), patient=f"Patient/{pid}")
            for i, (concept, value, days) in enumerate(rows)
        ]
    made[f"cds-agran-{unique}"].append(
        statement(
            f"cds-agran-{unique}-med", "clozapine 200 mg", start=days_ago(60), patient_ref=f"Patient/cds-agran-{unique}"
        )
    )
    put(client, *(r for resources in made.values() for r in resources))
    return sorted(made)


def _cards_and_flags(fhir_base_url, fhir_client, tmp_path, name, patients, as_of=None):
    """(cards by patient and uuid, the uuids the run's active Flags call for, the cards' indicators): the run and the
    service evaluate as of the same instant (`as_of`, else the clock)."""
    from support.server_data import project_flags

    config = rules_with_own_tag(tmp_path, f"cds-{name}")
    rules = load_config(config)
    report = run_pipeline(fhir_client, rules, tmp_path / f"run-{name}", patients=patients, now=as_of)
    assert report["status"] == "done"
    flags = project_flags(fhir_client, patients, rules)
    expected = {
        (f["subject"]["reference"], str(uuid.uuid5(CARD_NAMESPACE, f["identifier"][0]["value"])))
        for f in flags
        if f["status"] == "active"
    }
    args = ("--config", str(config)) + (("--as-of", as_of.isoformat()) if as_of else ())
    with CdsProcess(tmp_path / f"svc-{name}", session_port(18), fhir_base_url, EhrKeys(tmp_path), args=args) as service:
        cards, indicators = set(), {}
        for pid in patients:
            answer = _post(service, PATIENT_VIEW, patient_view_request(pid))
            assert answer.status_code == 200, answer.text
            for card in answer.json()["cards"]:
                cards.add((f"Patient/{pid}", card["uuid"]))
                indicators[pid] = card["indicator"]
    return cards, expected, indicators, flags


def test_the_cards_agree_with_the_flags_a_run_writes_for_the_sample_data(fhir_base_url, fhir_client, unique, tmp_path):
    """Every active Flag the run writes for the sample patients has its card, and there is no card without one. The
    sample data ends in December 2020: the run and the service evaluate as of 2021-01-01 (as of now, every episode
    would have lapsed)."""
    from support.server_data import remove_results

    sample, patients = _sample_copy(tmp_path / "sample", unique)
    assert load_files(fhir_client, [str(sample)]).ok
    try:
        cards, expected, _, flags = _cards_and_flags(
            fhir_base_url,
            fhir_client,
            tmp_path,
            f"sample-{unique}",
            patients,
            datetime(2021, 1, 1, tzinfo=timezone.utc),
        )
    finally:
        remove_results(fhir_client, patients)  # a later default-tag backfill then wants no Flag for the copies
    assert len(expected) == 1 and len(flags) == 7  # one open episode; six closed ones get no card
    assert cards == expected


def test_the_cards_agree_with_the_flags_for_recent_counts_of_every_severity(
    fhir_base_url, fhir_client, unique, tmp_path
):
    patients = _recent_patients(fhir_client, unique)
    cards, expected, indicators, _ = _cards_and_flags(
        fhir_base_url, fhir_client, tmp_path, f"recent-{unique}", patients
    )
    assert cards == expected
    assert indicators == {
        f"cds-agran-{unique}": "critical",
        f"cds-leuko-{unique}": "warning",
        f"cds-lymph-{unique}": "info",
    }
