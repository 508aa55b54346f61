"""One real Airflow (api-server, scheduler, dag-processor; LocalExecutor) for every end-to-end test, on the repository's
dags/ and the session's FHIR server."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from support.airflow_server import LATENCY_SETTINGS, LocalAirflow
from support.ports import session_port


@pytest.fixture(scope="package")
def airflow(fhir_base_url, tmp_path_factory):
    env = {
        "AIRFLOW_CONN_FHIR_DEFAULT": json.dumps({"conn_type": "fhir", "host": fhir_base_url}),
        # Minute intervals instead of hours: a backfill only covers complete intervals, and a test must not wait for
        # the hour to end to cover the data it has just written.
        "LEUKOFHIR_SURVEILLANCE_CRON": "* * * * *",
        # The settings the README gives the near-real-time path, so the tests run tasks as production would.
        **LATENCY_SETTINGS,
    }
    with LocalAirflow(
        tmp_path_factory.mktemp("airflow-e2e"), session_port(9), dags_folder=ROOT / "dags", extra_env=env
    ) as stack:
        yield stack
