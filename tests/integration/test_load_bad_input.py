"""`leukofhir load` with hostile input and an unlucky server (issue 9): the real HAPI server, faults from the proxy."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from contextlib import redirect_stdout
from types import SimpleNamespace

import pytest

from leukofhir.cli import main
from leukofhir.errors import EXIT_AUTH, EXIT_SERVER
from leukofhir.fhir.client import FhirClient
from leukofhir.write.load import run_load
from support.faultproxy import Fault

pytestmark = pytest.mark.fhir


def _ndjson(path, resources):
    path.write_text("".join(json.dumps(r) + "\n" for r in resources))
    return path


def _patients(prefix, n):
    return [{"resourceType": "Patient", "id": f"{prefix}-{i}"} for i in range(n)]


def _run(client, files, tmp_path, batch_size=10, out=None):
    """run_load as `leukofhir load` runs it, with a client that retries fast; (exit code, stdout)."""
    args = SimpleNamespace(files=[str(f) for f in files], batch_size=batch_size, out=str(out) if out else None)
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = run_load(client, args)
    return code, printed.getvalue()


@pytest.fixture
def proxied(proxy):
    with FhirClient(proxy.base_url, timeout=60, backoff=0.01, max_retries=2) as client:
        yield client


# --- 9.1 a deeply nested line ---------------------------------------------------------------------------------------


def test_load_goes_on_past_a_deeply_nested_line(fhir_base_url, unique, tmp_path, capsys):
    path = tmp_path / "in.ndjson"
    deep = '{"resourceType":"Patient","id":"deep-%s","x":%s1%s}' % (unique, "[" * 1000, "]" * 1000)
    path.write_text(json.dumps({"resourceType": "Patient", "id": f"ok-{unique}"}) + "\n" + deep + "\n")
    assert main(["load", "--fhir-url", fhir_base_url, str(path), "--out", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "read 1 resources, wrote 1, rejected 1" in out
    assert f"REJECTED {path}:2: nested deeper than 100 levels" in out


# --- 9.6 401/403: stop at the first one --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_load_stops_at_the_first_authentication_failure(proxy, proxied, unique, tmp_path, status):
    path = _ndjson(tmp_path / "p.ndjson", _patients(f"auth{status}-{unique}", 30))
    refusal = Fault(
        "status",
        status=status,
        headers={"Content-Type": "application/fhir+json"},
        body='{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"security"}]}',
    )
    proxy.add(*[refusal] * 100)
    code, out = _run(proxied, [path], tmp_path, batch_size=5)
    assert code == EXIT_AUTH == 3
    assert len(proxy.requests) == 1  # not one per batch, not one per resource
    assert "read 30 resources, wrote 0" in out
    assert f"HTTP {status}" in out


# --- 9.7 every entry sent has its response; a server that dies mid-load ------------------------------------------


def test_an_empty_transaction_response_is_not_success(proxy, proxied, unique, tmp_path):
    path = _ndjson(tmp_path / "p.ndjson", _patients(f"empty-{unique}", 3))
    proxy.add(
        Fault(
            "status",
            status=200,
            headers={"Content-Type": "application/fhir+json"},
            body='{"resourceType":"Bundle","type":"transaction-response","entry":[]}',
        )
    )
    code, out = _run(proxied, [path], tmp_path)
    assert code == EXIT_SERVER == 4
    assert "read 3 resources, wrote 0" in out
    assert "answered 0 of the 3 entries sent" in out


def test_a_server_that_dies_mid_load_leaves_a_report_of_what_was_written(fhir_client, proxy, proxied, unique, tmp_path):
    path = _ndjson(tmp_path / "p.ndjson", _patients(f"dies-{unique}", 25))
    # The first transaction goes through, then every connection is dropped without an answer.
    proxy.add(Fault("delay", seconds=0), *[Fault("reset")] * 100)
    code, out = _run(proxied, [path], tmp_path, batch_size=10)
    assert code == EXIT_SERVER
    assert "read 25 resources, wrote 10" in out
    assert "stopped: POST" in out and "no answer after 3 tries" in out
    assert fhir_client.read("Patient", f"dies-{unique}-9") is not None
    assert fhir_client.read("Patient", f"dies-{unique}-10") is None


# --- 9.9 ids checked before they go near a URL ----------------------------------------------------------------------


def test_ids_that_are_not_fhir_ids_are_refused_before_any_request(fhir_client, proxy, proxied, unique, tmp_path):
    victim = {"resourceType": "Patient", "id": f"victim-{unique}", "gender": "female"}
    fhir_client.update(victim)
    before = fhir_client.read("Patient", victim["id"])
    hostile = [
        {"resourceType": "Patient", "id": f"victim-{unique}/_history/1", "gender": "male"},
        {"resourceType": "Patient", "id": f"evil?_id=victim-{unique}", "gender": "male"},
        {"resourceType": "Patient", "id": "x" * 65},
        {"resourceType": "Patient", "id": ""},
        {"resourceType": "Patient", "id": 12},
        {"resourceType": "Patient/../Observation", "id": f"t-{unique}"},
    ]
    path = _ndjson(tmp_path / "hostile.ndjson", hostile + [{"resourceType": "Patient", "id": f"fine-{unique}"}])
    code, out = _run(proxied, [path], tmp_path)
    assert code == 1
    assert "read 1 resources, wrote 1, rejected 6" in out
    assert out.count("is not a valid FHIR id") == 5
    assert f"REJECTED Patient at {path}:1: id 'victim-{unique}/_history/1' is not a valid FHIR id" in out
    assert "'Patient/../Observation' is not a FHIR resource type" in out
    assert len(proxy.requests) == 1  # one transaction, of the one fine Patient
    after = fhir_client.read("Patient", victim["id"])
    assert after["meta"]["versionId"] == before["meta"]["versionId"] and after["gender"] == "female"


def test_client_read_and_update_refuse_ids_that_are_not_fhir_ids(fhir_client, unique):
    from leukofhir.fhir.ids import InvalidIdError

    with pytest.raises(InvalidIdError):
        fhir_client.read("Patient", f"x-{unique}/_history/1")
    with pytest.raises(InvalidIdError):
        fhir_client.update({"resourceType": "Patient", "id": f"evil?_id=x-{unique}"})
    with pytest.raises(InvalidIdError):
        fhir_client.read("Patient?_id=a", "b")


# --- 9.13 server refusals: ids, paths and codes on stdout; the full text in the rejects file ---------------------


def test_refusals_show_ids_paths_and_codes_and_the_full_text_goes_to_the_rejects_file(
    fhir_base_url, unique, tmp_path, capsys, caplog
):
    caplog.set_level(logging.DEBUG)
    path = _ndjson(
        tmp_path / "p.ndjson",
        [
            {
                "resourceType": "Patient",
                "id": f"bd-{unique}",
                "birthDate": "1970-13-45",
                "name": [{"family": "Zyxwvutsrq"}],
            },
            {"resourceType": "Patient", "id": f"good-{unique}"},
        ],
    )
    run_dir = tmp_path / "run"
    assert main(["load", "--fhir-url", fhir_base_url, str(path), "--out", str(run_dir)]) == 1
    captured = capsys.readouterr()
    shown = captured.out + captured.err + "\n".join(r.getMessage() for r in caplog.records)
    assert "1970-13-45" not in shown and "Zyxwvutsrq" not in shown
    line = next(x for x in captured.out.splitlines() if "REJECTED" in x)
    assert f"REJECTED Patient/bd-{unique}: HTTP 400" in line
    assert "HAPI-1821" in line and "birthDate" in line and "processing" in line
    assert f"{run_dir / 'rejects.ndjson'}" in captured.out
    (reject,) = [json.loads(x) for x in (run_dir / "rejects.ndjson").read_text().splitlines()]
    assert reject["resource"] == f"Patient/bd-{unique}" and reject["status"] == 400
    assert "1970-13-45" in json.dumps(reject["outcome"])  # the server's full text, for the people allowed to see it


def test_the_default_run_folder_is_a_fresh_one(fhir_base_url, unique, tmp_path, capsys):
    path = _ndjson(tmp_path / "p.ndjson", [{"resourceType": "Patient", "id": f"bd2-{unique}", "birthDate": "x"}])
    assert main(["load", "--fhir-url", fhir_base_url, str(path)]) == 1
    out = capsys.readouterr().out
    shown = next(x for x in out.splitlines() if "rejects.ndjson" in x)
    rejects = shown.split(": ", 1)[1].strip()
    assert rejects.endswith("rejects.ndjson") and str(tmp_path) not in rejects
    try:
        assert json.loads(open(rejects).read())["resource"] == f"Patient/bd2-{unique}"
    finally:
        shutil.rmtree(os.path.dirname(rejects))


def test_nan_and_infinity_are_refused_before_any_request(proxy, proxied, unique, tmp_path):
    path = tmp_path / "nan.ndjson"
    path.write_text(
        '{"resourceType":"Observation","id":"nan-%s","status":"final","valueQuantity":{"value":NaN}}\n'
        '{"resourceType":"Observation","id":"inf-%s","status":"final","valueQuantity":{"value":1e400}}\n'
        '{"resourceType":"Patient","id":"fine-nan-%s"}\n' % (unique, unique, unique)
    )
    code, out = _run(proxied, [path], tmp_path)
    assert code == 1
    assert "read 1 resources, wrote 1, rejected 2" in out
    assert f"REJECTED Observation at {path}:1: holds NaN or Infinity" in out
    assert f"REJECTED Observation at {path}:2: holds NaN or Infinity" in out
    assert len(proxy.requests) == 1


@pytest.mark.parametrize("status", [404, 405])
def test_a_url_that_takes_no_transactions_stops_the_load(proxy, proxied, unique, tmp_path, status):
    path = _ndjson(tmp_path / "p.ndjson", _patients(f"noendpoint{status}-{unique}", 30))
    proxy.add(*[Fault("status", status=status, headers={"Content-Type": "text/html"}, body="<h1>no</h1>")] * 100)
    code, out = _run(proxied, [path], tmp_path, batch_size=5)
    assert code == EXIT_SERVER
    assert len(proxy.requests) == 1  # not each resource on its own, twice
    assert f"stopped: HTTP {status}" in out and "rejected 0" in out
