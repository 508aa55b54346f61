"""R4 rest-hook Subscriptions on the real HAPI server (our launcher), and `leukofhir subscribe` against it."""

from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from leukofhir.cli import main
from leukofhir.config import load_config
from leukofhir.realtime.subscribe import SEND_DELETES_EXTENSION, subscribe, subscription_specs, unsubscribe
from support.fhir_builders import observation, patient

pytestmark = pytest.mark.fhir

SECRET = "test-secret-0123456789abcdef"


class HookListener:
    """A plain HTTP server on loopback that records every request the FHIR server sends it."""

    def __init__(self):
        self.received: queue.Queue = queue.Queue()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                listener.received.put((self.command, self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST = do_DELETE = _record

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def next(self, timeout: float = 30.0):
        return self.received.get(timeout=timeout)

    def quiet(self, seconds: float) -> list:
        """Everything that arrives within `seconds`."""
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.received.get(timeout=left))
            except queue.Empty:
                break
        return got


def _await_status(fhir_client, sid: str, status: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = fhir_client.read("Subscription", sid)
        if current.get("status") == status or time.monotonic() > deadline:
            return current
        time.sleep(0.3)


def test_rest_hook_delivers_the_observation_to_a_listener(fhir_client, unique):
    fhir_client.update(patient(f"p-{unique}"))
    with HookListener() as hook:
        sub = fhir_client.request(
            "POST",
            "Subscription",
            json={
                "resourceType": "Subscription",
                "status": "requested",
                "reason": f"test {unique}",
                "criteria": "Observation?code=http://loinc.org|6690-2",
                "channel": {
                    "type": "rest-hook",
                    "endpoint": hook.url,
                    "payload": "application/fhir+json",
                    "header": [f"Authorization: Bearer {SECRET}"],
                    "extension": [{"url": SEND_DELETES_EXTENSION, "valueBoolean": True}],
                },
            },
        ).json()
        try:
            active = _await_status(fhir_client, sub["id"], "active")
            assert active["status"] == "active"
            tags = {t["system"].rsplit("/", 1)[-1]: t["code"] for t in active["meta"].get("tag", [])}
            assert tags["subscription-matching-strategy"] == "IN_MEMORY"

            # Urine leukocytes (30405-5) look alike and must not be delivered; the WBC must.
            fhir_client.update(observation(f"u-{unique}", "wbc", 2.0, code="30405-5", patient=f"Patient/p-{unique}"))
            started = time.monotonic()
            fhir_client.update(observation(f"w-{unique}", "wbc", 2.1, patient=f"Patient/p-{unique}"))
            method, path, headers, body = hook.next()
            delivery_s = time.monotonic() - started
            assert (method, path) == ("PUT", f"/hook/Observation/w-{unique}")
            assert headers["Authorization"] == f"Bearer {SECRET}"
            assert headers["Content-Type"].startswith("application/fhir+json")
            delivered = json.loads(body)
            assert delivered["subject"]["reference"] == f"Patient/p-{unique}"
            assert delivered["valueQuantity"]["value"] == 2.1
            # The submission interval is 1 s (HAPI's default 5 s): delivered well within 5 s on this server.
            assert delivery_s < 5, delivery_s

            # A deletion arrives as DELETE (HAPI sends it only with the send-delete-messages extension).
            fhir_client.request("DELETE", f"Observation/w-{unique}")
            method, path, headers, body = hook.next()
            assert (method, path, body) == ("DELETE", f"/hook/Observation/w-{unique}", b"")
            assert headers["Authorization"] == f"Bearer {SECRET}"
            assert hook.quiet(2.5) == []  # nothing for the urine result, nothing twice
        finally:
            fhir_client.request("DELETE", f"Subscription/{sub['id']}")


def _ours(fhir_client, rules) -> list[dict]:
    tag = f"{rules.uris.tag_system}|{rules.uris.tag_code}"
    return list(fhir_client.search("Subscription", {"_tag": tag}))


def test_subscribe_twice_leaves_one_subscription_of_each_kind(fhir_client, unique):
    rules = load_config()
    kinds = sorted(s.resource_type for s in subscription_specs(rules))
    assert kinds == ["MedicationAdministration", "MedicationRequest", "MedicationStatement", "Observation"]
    endpoint = f"http://127.0.0.1:9/{unique}"
    try:
        first = subscribe(fhir_client, endpoint, SECRET, rules)
        assert sorted((r.resource_type, r.action) for r in first) == [(k, "created") for k in kinds]
        assert {r.status for r in first} == {"active"} and {r.matching for r in first} == {"IN_MEMORY"}
        versions = {s["id"]: s["meta"]["versionId"] for s in _ours(fhir_client, rules)}

        second = subscribe(fhir_client, endpoint, SECRET, rules)
        assert sorted((r.resource_type, r.action) for r in second) == [(k, "unchanged") for k in kinds]
        held = _ours(fhir_client, rules)
        assert sorted(s["criteria"].split("?")[0] for s in held) == kinds
        assert {s["id"]: s["meta"]["versionId"] for s in held} == versions  # nothing rewritten

        observation_sub = next(s for s in held if s["criteria"].startswith("Observation?"))
        # The LOINC sets of clinical-rules §1.1 come from the rules file, whole; the urine look-alike is not in.
        for code in rules.code_to_concept:
            assert f"http://loinc.org|{code}," in observation_sub["criteria"] + ","
        assert "30405-5" not in observation_sub["criteria"]
        assert observation_sub["channel"]["payload"] == "application/fhir+json"
        assert observation_sub["channel"]["header"] == [f"Authorization: Bearer {SECRET}"]

        # A new endpoint updates the same Subscriptions in place; a stray duplicate is removed.
        dup = dict(next(s for s in held if s["criteria"].startswith("MedicationStatement")))
        dup.pop("id")
        dup.pop("meta")
        fhir_client.request(
            "POST",
            "Subscription",
            json=dict(dup, meta={"tag": [{"system": rules.uris.tag_system, "code": rules.uris.tag_code}]}),
        )
        third = subscribe(fhir_client, endpoint + "-moved", SECRET, rules)
        assert [r.resource_type for r in third if r.action == "removed"] == ["MedicationStatement"]
        assert sorted(r.resource_type for r in third if r.action == "updated") == kinds
        held = _ours(fhir_client, rules)
        assert sorted(s["criteria"].split("?")[0] for s in held) == kinds
        assert {s["channel"]["endpoint"] for s in held} == {endpoint + "-moved"}
    finally:
        unsubscribe(fhir_client, rules)
    assert _ours(fhir_client, rules) == []


def test_subscribe_command_and_remove(fhir_base_url, fhir_client, unique, monkeypatch, capsys, tmp_path):
    rules = load_config()
    monkeypatch.delenv("LEUKOFHIR_HOOK_SECRET", raising=False)
    args = ["subscribe", "--fhir-url", fhir_base_url, "--endpoint", f"http://127.0.0.1:9/{unique}"]
    # Without a secret nothing is created: a receiver must be able to tell the server's calls from others'.
    assert main(args) == 2
    assert "LEUKOFHIR_HOOK_SECRET" in capsys.readouterr().err
    assert _ours(fhir_client, rules) == []

    secret_file = tmp_path / "hook-secret"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.setenv("LEUKOFHIR_HOOK_SECRET_FILE", str(secret_file))
    try:
        assert main(args) == 0
        out = capsys.readouterr().out
        assert out.count("created active") == 4
        assert SECRET not in out
        assert len(_ours(fhir_client, rules)) == 4
    finally:
        assert main(["subscribe", "--fhir-url", fhir_base_url, "--remove"]) == 0
    assert capsys.readouterr().out.count("removed") == 4
    assert _ours(fhir_client, rules) == []
