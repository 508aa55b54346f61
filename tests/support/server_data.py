"""Put test patients on the real FHIR server and read back the project's Flags, for the pipeline tests."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from leukofhir.config import DEFAULT_PATH, load_config
from leukofhir.write.flags import comparable

RULES = load_config()


def put(client, *resources: dict) -> None:
    """Write resources at their own ids in one transaction (targets first: Patients, then the rest)."""
    order = {"Patient": 0, "Medication": 1, "Observation": 2, "DiagnosticReport": 3}
    ordered = sorted(resources, key=lambda r: order.get(r["resourceType"], 4))
    entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in ordered]
    client.transaction(entries)


def server_now(client) -> datetime:
    """The server's own clock (a search Bundle's meta.lastUpdated): windows by _lastUpdated are in its time."""
    bundle = client.request_json("GET", "Patient", params={"_count": 0})
    return datetime.fromisoformat(bundle["meta"]["lastUpdated"]).astimezone(timezone.utc)


def pause() -> None:
    """Let the server's millisecond clock move on, so a write falls after an instant taken before it."""
    time.sleep(0.05)


def project_flags(client, patient_ids, rules=RULES) -> list[dict]:
    refs = ",".join(f"Patient/{p}" for p in patient_ids)
    tag = f"{rules.uris.tag_system}|{rules.uris.tag_code}"
    return list(client.search("Flag", {"subject": refs, "_tag": tag, "_count": 500}))


def rules_with_own_tag(folder: Path, code: str) -> Path:
    """A site rules file: the default rules with their own project tag code, so that the project's Flags on the
    session's server are those of one test (the lapse sweep reads every active project Flag of the server). Remove
    the test's results afterwards (remove_results)."""
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    assert text.count("tag_code: leukofhir\n") == 1
    path = Path(folder) / "rules.yaml"
    path.write_text(text.replace("tag_code: leukofhir\n", f"tag_code: {code}\n"), encoding="utf-8")
    return path


def remove_results(client, patient_ids) -> None:
    """Delete the patients' reports and results: a run with the default tag (a backfill of the whole server, later in
    the session) then wants no Flag for them. It would otherwise want one at the id where a Flag of another tag
    stands, which it cannot see, and be refused at every try (a conflict)."""
    refs = ",".join(f"Patient/{p}" for p in patient_ids)
    for resource_type in ("DiagnosticReport", "Observation"):  # reports first: they refer to the results
        for resource in list(client.search(resource_type, {"subject": refs, "_elements": "id", "_count": 500})):
            client.request("DELETE", f"{resource_type}/{resource['id']}")


def flags_by_identifier(flags: list[dict]) -> dict[str, dict]:
    """identifier value → the Flag as compared for writes; fails on two Flags with one identifier."""
    out: dict[str, dict] = {}
    for flag in flags:
        (value,) = [i["value"] for i in flag["identifier"] if i["system"] == RULES.uris.identifier_system]
        assert value not in out, f"two Flags share identifier {value}"
        out[value] = comparable(flag)
    return out


def versions(flags: list[dict]) -> dict[str, str]:
    return {f["id"]: f["meta"]["versionId"] for f in flags}


def without_patient(flag: dict) -> tuple:
    """A Flag's clinical content, independent of which patient (and so which identifier) it belongs to."""
    return (
        flag["status"],
        flag["code"]["coding"][0]["code"],
        flag["code"]["text"],
        flag["period"].get("start"),
        flag["period"].get("end"),
        tuple(sorted(e.get("valueInteger", 0) for e in flag.get("extension", []) if "valueInteger" in e)),
    )
