"""`leukofhir listen` as a process against crafted ids and references: every id and reference is checked with the
project's FHIR id rules (leukofhir/fhir/ids.py) before a URL or a queue entry is made of it. The requests are sent
byte for byte (http.client would keep `..`; requests and urllib3 would remove it before sending)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest

from support.faultproxy import FaultProxy
from support.fhir_builders import observation, patient
from support.hostile import exchange, request_head
from support.listen_process import listen_service
from support.ports import session_port

# A service process of its own (make test runs it; make test-unit does not).
pytestmark = pytest.mark.service

# Ids in the path as a client may write them: dot-segments, encoded or not; a query, a fragment, a slash inside.
CRAFTED_IDS = [
    ".",
    "..",
    "%2E",
    "%2E%2E",
    "%2e%2E",
    "x%3F_id%3Dvictim%26_count%3D1000",
    "x%23y",
    "a%2Fb",
    "x%00y",
    "%20",
    "a" * 65,
]
# A line break in the path: the router's path pattern (no DOTALL) does not match it, so it is FastAPI's 404.
LINE_BREAK_ID = "x%0D%0Ay"


def _send(target, method: str, path: str, body: bytes = b"") -> tuple[int | None, str]:
    headers = dict(target.auth(), **{"Content-Length": str(len(body)), "Content-Type": "application/fhir+json"})
    status, answer = exchange(target.port, request_head(method, path, headers) + body)
    return status, answer.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


def _pending(target) -> int:
    status, answer = exchange(target.port, request_head("GET", "/healthz"))
    return json.loads(answer.partition(b"\r\n\r\n")[2])["pending_patients"]


@pytest.fixture
def receiver(tmp_path):
    with listen_service(tmp_path, session_port(15), fhir_url="https://fhir.hospital.example/r4") as target:
        yield target


@pytest.mark.parametrize("crafted", CRAFTED_IDS)
def test_a_crafted_id_in_the_path_is_a_400(receiver, crafted):
    body = json.dumps(observation("x", "wbc", 1.0, patient="Patient/p1")).encode()
    for method, payload in (("PUT", body), ("DELETE", b"")):
        status, detail = _send(receiver, method, f"/notify/Observation/{crafted}", payload)
        assert status == 400, (method, crafted, status, detail)
        assert "not a valid FHIR id" in detail
    assert _pending(receiver) == 0


def test_a_line_break_in_the_path_is_refused(receiver):
    assert _send(receiver, "DELETE", f"/notify/Observation/{LINE_BREAK_ID}")[0] == 404
    assert _pending(receiver) == 0


@pytest.mark.parametrize(
    "reference, reason",
    [
        ("Patient/.", "not a valid FHIR id"),
        ("Patient/..", "not a valid FHIR id"),
        ("Patient/p?_id=victim", "not a valid FHIR id"),
        ("Patient/p#x", "not a valid FHIR id"),
        ("https://other.example/fhir/Patient/p", "another server"),
        ("https://fhir.hospital.example/r4evil/Patient/p", "another server"),
        ("http://fhir.hospital.example/r4/Patient/p", "another server"),
    ],
)
def test_a_subject_that_is_no_local_patient_is_a_400(receiver, reference, reason):
    body = json.dumps(observation("o1", "wbc", 1.0, patient=reference)).encode()
    status, detail = _send(receiver, "PUT", "/notify/Observation/o1", body)
    assert status == 400 and reason in detail, (reference, status, detail)
    assert _pending(receiver) == 0


def test_subjects_of_this_server_are_queued(receiver):
    for i, reference in enumerate(
        (
            "Patient/p1",
            "https://fhir.hospital.example/r4/Patient/p2",
            "https://fhir.hospital.example/r4/Patient/p3/_history/2",
        )
    ):
        body = json.dumps(observation(f"o{i}", "wbc", 1.0, patient=reference)).encode()
        assert _send(receiver, "PUT", f"/notify/Observation/o{i}", body)[0] == 200
    assert _pending(receiver) == 3


@pytest.mark.fhir
def test_a_deletion_reads_exactly_one_resource_history(fhir_base_url, fhir_client, tmp_path, unique):
    """The receiver's only request to the FHIR server is the deleted resource's own `_history`, whatever id a
    client crafts (the fault proxy in front of HAPI records what it asked for)."""
    fhir_client.update(patient(f"del-{unique}"))
    oid = f"del-{unique}"
    fhir_client.update(observation(oid, "wbc", 1.0, patient=f"Patient/del-{unique}"))
    fhir_client.request("DELETE", f"Observation/{oid}")
    with FaultProxy(fhir_base_url) as proxy:
        with listen_service(tmp_path, session_port(15), fhir_url=proxy.base_url) as target:
            for crafted in CRAFTED_IDS:
                assert _send(target, "DELETE", f"/notify/Observation/{crafted}")[0] == 400, crafted
            assert _send(target, "DELETE", f"/notify/Observation/{LINE_BREAK_ID}")[0] == 404
            assert proxy.requests == []
            assert _send(target, "DELETE", f"/notify/Observation/{oid}")[0] == 200
            assert _pending(target) == 1
        asked = [(method, path) for method, path, _ in proxy.requests]
    base_path = urlsplit(proxy.base_url).path
    assert asked == [("GET", f"{base_path}/Observation/{oid}/_history?_count=10")]
