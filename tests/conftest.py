"""Shared fixtures: one real HAPI FHIR server per test session (or FHIR_BASE_URL), and a FHIR client on it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
EXTERNAL = DATA / "external"
LAUNCHER = str(ROOT / "scripts" / "fhir-server")
sys.path.insert(0, str(ROOT / "tests"))
# Airflow reads its home on import; tests must never write into the user's ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="leukofhir-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))


@pytest.fixture(scope="session")
def fhir_server_env(tmp_path_factory):
    """The environment the project's launcher runs the test server with; None when FHIR_BASE_URL names a server."""
    if os.environ.get("FHIR_BASE_URL"):
        return None
    return dict(
        os.environ,
        FHIR_PORT=os.environ.get("FHIR_TEST_PORT", "8181"),
        FHIR_DATA_DIR=str(tmp_path_factory.mktemp("hapi-data")),
    )


@pytest.fixture(scope="session")
def fhir_base_url(fhir_server_env):
    """The real HAPI FHIR JPA server the tests talk to.

    FHIR_BASE_URL reuses a running server; otherwise the project's launcher starts a fresh one on its own
    port and data directory (so a `make demo` server is never touched) and stops it after the session."""
    if fhir_server_env is None:
        yield os.environ["FHIR_BASE_URL"].rstrip("/")
        return
    started = subprocess.run([LAUNCHER, "start"], env=fhir_server_env, capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"FHIR server did not start:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
    try:
        yield started.stdout.strip().splitlines()[-1].rstrip("/")
    finally:
        subprocess.run([LAUNCHER, "stop"], env=fhir_server_env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def fhir_client(fhir_base_url):
    from leukofhir.fhir.client import FhirClient

    with FhirClient(fhir_base_url, timeout=120, backoff=0.01) as client:
        yield client


@pytest.fixture
def unique():
    """A fresh token per test, so tests sharing the session's server never see each other's resources."""
    return uuid.uuid4().hex[:12]


@pytest.fixture
def own_tag(fhir_client, unique, tmp_path):
    """(site rules file, patients): the default rules with this test's own project tag, so that the project's Flags
    on the session's server are the test's alone (the lapse sweep reads them all); the test adds the ids of the
    patients it puts on the server, whose results are deleted afterwards (support.server_data.remove_results)."""
    from support.server_data import remove_results, rules_with_own_tag

    patients: list[str] = []
    yield rules_with_own_tag(tmp_path, f"own-{unique}"), patients
    if patients:
        remove_results(fhir_client, patients)


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata database (SQLite in the session's AIRFLOW_HOME), migrated once: dag.test() needs it."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture(scope="session")
def fhir_connection(fhir_base_url):
    """The `fhir_default` Airflow connection, from the environment only (JSON form), on the test server."""
    import json

    os.environ["AIRFLOW_CONN_FHIR_DEFAULT"] = json.dumps({"conn_type": "fhir", "host": fhir_base_url})
    yield fhir_base_url
    os.environ.pop("AIRFLOW_CONN_FHIR_DEFAULT", None)


@pytest.fixture
def proxy(fhir_base_url):
    """The project's fault-injecting proxy in front of the real server (tests/support/faultproxy.py)."""
    from support.faultproxy import FaultProxy

    with FaultProxy(fhir_base_url) as p:
        yield p


@pytest.fixture
def sleeps():
    """The waits a client asked for (pass `sleep=sleeps.append`): retries are checked without waiting them out."""
    return []
