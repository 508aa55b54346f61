"""`FHIR_DB=postgres scripts/fhir-server`: the same HAPI on a PostgreSQL cluster of its own. The backfill DAG gives the
Flags it gives on H2; the launcher keeps PostgreSQL on loopback with a generated password, checks its query plans at
start-up, keeps the data across a restart and stops PostgreSQL with the server.

One server for the module (FHIR_TEST_PORT + 15, its PostgreSQL + 16), beside the session's H2 server; marked
`postgres` so that `pytest -m postgres` selects it."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import EXTERNAL, LAUNCHER, ROOT

from leukofhir.fhir.client import FhirClient
from leukofhir.write.load import load_files
from support.fhir_builders import at, observation, patient
from support.ports import session_port
from support.server_data import flags_by_identifier, project_flags, put, server_now

pytestmark = [pytest.mark.fhir, pytest.mark.postgres]

SYNTHEA_BUNDLES = sorted((EXTERNAL / "smart-generated-sample-data-R4-synthea" / "bundles").glob("*.json.gz"))
PORT, PG_PORT = session_port(15), session_port(16)


def _launcher(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([LAUNCHER, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pg(fhir_server_env):
    """The PostgreSQL-backed server: {"env", "url", "home"} (home: its cluster folder with the password file)."""
    if fhir_server_env is None:
        pytest.skip("FHIR_BASE_URL names an outside server: the launcher is not in charge of servers here")
    folder = Path(tempfile.mkdtemp(prefix="leukofhir-pg-"))
    folder.chmod(0o755)  # PostgreSQL's own user (`postgres` when root) reaches its cluster under it
    env = dict(
        os.environ, FHIR_PORT=str(PORT), FHIR_PG_PORT=str(PG_PORT), FHIR_DB="postgres", FHIR_DATA_DIR=str(folder)
    )
    started = _launcher(env, "start", timeout=900)
    if started.returncode != 0:
        pytest.fail(f"the PostgreSQL-backed server did not start:\n{started.stdout[-2000:]}\n{started.stderr[-4000:]}")
    try:
        yield {"env": env, "url": started.stdout.strip().splitlines()[-1], "home": folder / "postgres"}
    finally:
        _launcher(env, "stop", timeout=300)
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def _run_backfill(base_url: str, until: str) -> dict:
    """The backfill DAG by dag.test() against `base_url` (the connection from the environment, as in production)."""
    from airflow.dag_processing.dagbag import DagBag

    previous = os.environ.get("AIRFLOW_CONN_FHIR_DEFAULT")
    os.environ["AIRFLOW_CONN_FHIR_DEFAULT"] = json.dumps({"conn_type": "fhir", "host": base_url})
    try:
        dag = DagBag(str(ROOT / "dags")).dags["leukopenia_backfill"]
        run = dag.test(run_conf={"start": "1900-01-01", "end": until, "chunks": 2, "extract": "search"})
    finally:
        if previous is None:
            os.environ.pop("AIRFLOW_CONN_FHIR_DEFAULT", None)
        else:
            os.environ["AIRFLOW_CONN_FHIR_DEFAULT"] = previous
    assert run.state == "success", f"backfill run {run.run_id} on {base_url} ended {run.state}"
    folder = (
        Path(os.environ["AIRFLOW_HOME"])
        / "leukofhir-runs"
        / "leukopenia_backfill"
        / re.sub(r"[^A-Za-z0-9._-]+", "_", run.run_id)
    )
    return json.loads((folder / "report.json").read_text(encoding="utf-8"))


def test_the_backfill_dag_gives_the_same_flags_on_postgresql_as_on_h2(pg, airflow_db, fhir_client, unique):
    # The sample patients and one patient with a low count of their own, on both servers; a backfill on each.
    pid = f"pg-{unique}"
    mine = [patient(pid), observation(f"{pid}-w", "wbc", 1.4, time=at(days=-3), patient=f"Patient/{pid}")]
    ids = sorted(json.load(gzip.open(p, "rt"))["entry"][0]["resource"]["id"] for p in SYNTHEA_BUNDLES) + [pid]
    flags = {}
    with FhirClient(pg["url"], timeout=120) as pg_client:
        for name, client in (("h2", fhir_client), ("postgres", pg_client)):
            assert load_files(client, SYNTHEA_BUNDLES, batch_size=250, workers=2).ok
            put(client, *mine)
            until = (server_now(client) + timedelta(days=1)).date().isoformat()
            report = _run_backfill(client.base_url.rstrip("/"), until)
            assert report["reconciled"] and report["patients_touched"] >= len(ids)
            flags[name] = flags_by_identifier(project_flags(client, ids))
    assert flags["postgres"] == flags["h2"]
    assert any(f["subject"]["reference"] == f"Patient/{pid}" for f in flags["postgres"].values())


def test_postgresql_listens_on_loopback_only_with_a_generated_password_in_a_private_file(pg):
    password_file = pg["home"] / "password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = password_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{48}", password)  # generated (192 bits), never a default
    status = _launcher(pg["env"], "status")
    assert status.returncode == 0 and f"PostgreSQL running on 127.0.0.1:{PG_PORT}" in status.stdout
    listening = _listening()
    assert listening[PG_PORT] == {"127.0.0.1"} and listening[PORT] == {"127.0.0.1"}  # (Java: ::ffff:127.0.0.1)
    java = int((ROOT / "fhir-server" / "target" / f"fhir-server-{PORT}.pid").read_text())
    assert password not in Path(f"/proc/{java}/cmdline").read_text()  # in its environment, not in `ps`


def _listening() -> dict[int, set[str]]:
    """Local addresses of the listening TCP sockets, by port (/proc/net/tcp and tcp6)."""
    import ipaddress

    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            found.setdefault(int(port, 16), set()).add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return found


def test_the_start_up_check_of_postgresqls_query_plans_passes(pg):
    log = (ROOT / "fhir-server" / "target" / f"fhir-server-{PORT}.log").read_text(encoding="utf-8", errors="replace")
    assert "PostgreSQL is not ready" not in log
    assert re.search(
        r"PostgreSQL query plans: the 9 indexes of the pipeline's searches \(.*idx_rl_tgt_v2.*\), "
        r"autovacuum ok",
        log,
    )


def test_a_restart_keeps_the_data_and_stop_stops_postgresql_too(pg, unique):
    pid = f"pgr-{unique}"
    with FhirClient(pg["url"], timeout=120) as client:
        put(client, patient(pid))
    stopped = _launcher(pg["env"], "stop")
    assert stopped.returncode == 0 and "stopping PostgreSQL" in stopped.stderr
    assert not (pg["home"] / "data" / "postmaster.pid").exists()
    assert PG_PORT not in _listening() and PORT not in _listening()
    status = _launcher({k: v for k, v in pg["env"].items() if k != "FHIR_DB"}, "status")  # remembered per port
    assert status.returncode == 3 and "PostgreSQL stopped" in status.stdout

    again = _launcher(pg["env"], "start", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    with FhirClient(pg["url"], timeout=120) as client:
        assert client.read("Patient", pid)["id"] == pid
