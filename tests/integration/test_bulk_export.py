"""Bulk Data `$export` against the real HAPI server (bulk export on), with faults and manifest edits from the proxy."""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import subprocess
import sys
import time

import pytest
from conftest import EXTERNAL

from leukofhir.errors import UsageError
from leukofhir.fhir.auth import BearerAuth
from leukofhir.fhir.bulk import ERRORS_FILE, STATE_FILE, BulkExport, ExportRequest, export
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import ForeignLinkError, TemporaryFhirError
from leukofhir.write.load import load_files
from support.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.fhir

SYNTHEA = sorted((EXTERNAL / "smart-generated-sample-data-R4-synthea" / "bundles").glob("*.json.gz"))
POLL = r"export-poll-status"


@pytest.fixture
def waits():
    return []


def _client(base_url, waits, **kwargs):
    # Record every wait, but wait only briefly: HAPI's jobs take a few seconds whatever we are told.
    return FhirClient(base_url, sleep=lambda s: (waits.append(s), time.sleep(min(s, 0.3))), backoff=0.01, **kwargs)


def _tagged_patients(fhir_client, unique, n=3) -> list[str]:
    ids = [f"bx{i}-{unique}" for i in range(n)]
    for pid in ids:
        fhir_client.update(
            {"resourceType": "Patient", "id": pid, "meta": {"tag": [{"system": "urn:test", "code": unique}]}}
        )
    return ids


def _tagged(unique) -> ExportRequest:
    return ExportRequest(types=("Patient",), type_filters=(f"Patient?_tag=urn:test|{unique}",))


def _ids(folder, rtype="Patient") -> list[str]:
    return sorted(
        json.loads(line)["id"] for f in folder.glob(f"{rtype}.*.ndjson") for line in f.read_text().splitlines()
    )


def _kick_offs(proxy) -> int:
    return sum(1 for m, p, _ in proxy.requests if m == "GET" and "/$export?" in p)


def test_export_writes_the_servers_resources_polls_within_the_cap_and_deletes_the_job(
    proxy, fhir_client, unique, tmp_path, waits, caplog
):
    caplog.set_level(logging.INFO)
    ids = _tagged_patients(fhir_client, unique)
    with _client(proxy.base_url, waits) as client:
        result = export(client, tmp_path, _tagged(unique), max_interval=8)
    assert _ids(tmp_path) == ids and result.counts == {"Patient": 3}
    assert result.transaction_time and not result.resumed and result.errors == 0
    # HAPI asks for Retry-After: 120 while its job takes seconds: polls come at 1, 2, 4 … s, never above the cap.
    assert waits and all(w <= 8 for w in waits) and waits == sorted(waits)
    assert "server asked 120" in caplog.text and "Build in progress" in caplog.text  # X-Progress, logged
    assert any(m == "DELETE" and POLL in p for m, p, _ in proxy.requests)
    assert json.loads((tmp_path / STATE_FILE).read_text())["complete"] is True
    assert not list(tmp_path.glob("*.part"))


def test_export_then_evaluate_gives_the_same_flags_as_evaluate_on_the_files(
    fhir_base_url, fhir_client, unique, tmp_path
):
    """The issue's proof: the sample loaded with `load`, exported, evaluated; against evaluate on the files."""
    report = load_files(fhir_client, SYNTHEA, batch_size=250)
    assert report.ok
    patients = [json.load(gzip.open(p, "rt"))["entry"][0]["resource"]["id"] for p in SYNTHEA]
    fhir_client.update(
        {
            "resourceType": "Group",
            "id": f"eq-{unique}",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{p}"}} for p in patients],
        }
    )

    def cli(*args):
        done = subprocess.run(
            [sys.executable, "-m", "leukofhir.cli", *args],
            capture_output=True,
            text=True,
            timeout=900,
            env=dict(os.environ),
        )
        assert done.returncode == 0, done.stderr[-1500:]
        return done

    exported = tmp_path / "exported"
    cli(
        "export",
        "--fhir-url",
        fhir_base_url,
        "--group",
        f"eq-{unique}",
        "--out",
        str(exported),
        "--type",
        "Patient,Observation,DiagnosticReport",
        "--type",
        "MedicationRequest,MedicationStatement,MedicationAdministration",
    )
    cli("evaluate", str(exported), "--out", str(tmp_path / "from-export"))
    cli("evaluate", *map(str, SYNTHEA), "--out", str(tmp_path / "from-files"))

    def flags(name):
        return sorted((tmp_path / name / "Flag.ndjson").read_text().splitlines())

    assert sorted(_ids(exported)) == sorted(patients)
    assert flags("from-export") == flags("from-files")
    assert len(flags("from-files")) >= 5  # the sample has low counts: the comparison is not of two empty files


def test_a_gzip_encoded_download_is_written_as_plain_ndjson(proxy, fhir_client, unique, tmp_path, waits, caplog):
    caplog.set_level(logging.INFO)
    ids = _tagged_patients(fhir_client, unique)
    proxy.add(Fault("gzip", method="GET", path_regex="/Binary/"))
    with _client(proxy.base_url, waits) as client:
        export(client, tmp_path, _tagged(unique))
    assert _ids(tmp_path) == ids and "(gzip)" in caplog.text
    assert any("gzip" in h.get("Accept-Encoding", "") for _, p, h in proxy.requests if "/Binary/" in p)


def test_a_crash_while_polling_resumes_from_the_status_url(proxy, fhir_client, unique, tmp_path, waits):
    ids = _tagged_patients(fhir_client, unique)
    proxy.add(Fault("reset", method="GET", path_regex=POLL))
    with _client(proxy.base_url, waits, max_retries=0) as client, pytest.raises(TemporaryFhirError):
        export(client, tmp_path, _tagged(unique))
    assert "status_url" in json.loads((tmp_path / STATE_FILE).read_text())
    with _client(proxy.base_url, waits) as client:
        result = export(client, tmp_path, _tagged(unique))
    assert result.resumed and _ids(tmp_path) == ids
    assert _kick_offs(proxy) == 1  # the job was picked up again, not started twice


def test_a_crash_mid_download_fetches_only_the_missing_files(proxy, fhir_client, unique, tmp_path, waits):
    _tagged_patients(fhir_client, unique)
    request = ExportRequest(
        types=("Patient", "Group"), type_filters=(f"Patient?_tag=urn:test|{unique}", f"Group?_id=grp-{unique}")
    )
    fhir_client.update({"resourceType": "Group", "id": f"grp-{unique}", "type": "person", "actual": False})
    # The first file comes whole; the connection drops on the second.
    proxy.add(
        Fault("delay", seconds=0, method="GET", path_regex="/Binary/"),
        Fault("reset", method="GET", path_regex="/Binary/"),
    )
    with _client(proxy.base_url, waits, max_retries=0) as client, pytest.raises(TemporaryFhirError):
        export(client, tmp_path, request)
    done_before = json.loads((tmp_path / STATE_FILE).read_text())["done"]
    assert len(done_before) == 1
    binaries_before = sum(1 for m, p, _ in proxy.requests if "/Binary/" in p)
    with _client(proxy.base_url, waits) as client:
        result = export(client, tmp_path, request)
    assert result.resumed and result.counts == {"Patient": 3, "Group": 1}
    assert sum(1 for m, p, _ in proxy.requests if "/Binary/" in p) - binaries_before == 1
    assert _kick_offs(proxy) == 1


def test_the_manifests_error_files_are_reported(proxy, fhir_client, unique, tmp_path):
    _tagged_patients(fhir_client, unique, n=1)
    outcomes = [
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": f"Observation/o{i} failed"}],
        }
        for i, code in enumerate(["processing", "processing", "not-found"])
    ]
    data = "".join(json.dumps(o) + "\n" for o in outcomes).encode()
    fhir_client.update(
        {
            "resourceType": "Binary",
            "id": f"err-{unique}",
            "contentType": "application/fhir+ndjson",
            "data": base64.b64encode(data).decode(),
        }
    )
    errors = json.dumps([{"type": "OperationOutcome", "url": f"{proxy.base_url}/Binary/err-{unique}"}])
    proxy.add(
        *[
            Fault(
                "rewrite", method="GET", path_regex=POLL, pattern=r'"error" ?: ?\[ ?\]', replacement=f'"error":{errors}'
            )
            for _ in range(30)
        ]
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "leukofhir.cli",
            "export",
            "--fhir-url",
            proxy.base_url,
            "--type",
            "Patient",
            "--type-filter",
            f"Patient?_tag=urn:test|{unique}",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert done.returncode == 1, done.stderr[-800:]
    assert "the server reported 3 errors (not-found ×1, processing ×2)" in done.stderr
    assert "Observation/o0" not in done.stdout + done.stderr  # the outcomes' text stays in the file
    assert len((tmp_path / ERRORS_FILE).read_text().splitlines()) == 3
    assert _ids(tmp_path) == [f"bx0-{unique}"]


def test_the_token_goes_with_downloads_only_when_the_manifest_asks(proxy, fhir_client, unique, tmp_path, waits):
    _tagged_patients(fhir_client, unique, n=1)
    auth = BearerAuth(lambda: "test-token")
    with _client(proxy.base_url, waits, auth=auth) as client:
        export(client, tmp_path / "a", _tagged(unique))
    binaries = [h for m, p, h in proxy.requests if "/Binary/" in p]
    assert binaries and all(h.get("Authorization") == "Bearer test-token" for h in binaries)

    proxy.requests.clear()
    proxy.add(
        *[
            Fault(
                "rewrite",
                method="GET",
                path_regex=POLL,
                pattern=r'"requiresAccessToken" ?: ?true',
                replacement='"requiresAccessToken":false',
            )
            for _ in range(30)
        ]
    )
    with _client(proxy.base_url, waits, auth=auth) as client:
        export(client, tmp_path / "b", _tagged(unique))
    binaries = [h for m, p, h in proxy.requests if "/Binary/" in p]
    assert binaries and not any("Authorization" in h for h in binaries)
    assert _ids(tmp_path / "b") == [f"bx0-{unique}"]


def test_a_file_on_another_origin_never_gets_the_token(proxy, fhir_base_url, fhir_client, unique, tmp_path, waits):
    _tagged_patients(fhir_client, unique, n=1)
    with FaultProxy(fhir_base_url) as elsewhere:
        here = proxy.base_url.split("/fhir")[0]
        proxy.add(
            *[
                Fault(
                    "rewrite",
                    method="GET",
                    path_regex=POLL,
                    pattern=f'"url" ?: ?"{here}',
                    replacement=f'"url":"{elsewhere.base_url.split("/fhir")[0]}',
                )
                for _ in range(30)
            ]
        )
        with (
            _client(proxy.base_url, waits, auth=BearerAuth(lambda: "test-token")) as client,
            pytest.raises(ForeignLinkError, match="another origin"),
        ):
            export(client, tmp_path, _tagged(unique))
        assert elsewhere.requests == []


def test_poll_interval_grows_and_caps_the_servers_retry_after(fhir_client):
    bulk = BulkExport(fhir_client, "unused", max_interval=30)
    assert [bulk.poll_interval(n, "120") for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert bulk.poll_interval(3, "2") == 2 and bulk.poll_interval(2, None) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"level": "group"}, "group id"),
        ({"types": ("Observation; DROP",)}, "not a FHIR resource type"),
        ({"since": "yesterday"}, "ISO 8601"),
        ({"since": "2024-05-01T00:00:00"}, "time zone"),
        ({"type_filters": ("code=1",)}, r"Type\?search"),
        ({"level": "group", "group_id": "../x"}, "not a FHIR id"),
    ],
)
def test_export_request_is_checked(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ExportRequest(**kwargs)
