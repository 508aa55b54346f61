"""docker-compose.yml checked statically (no Docker engine runs here): services, pinned images, health, wiring."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
LONG_RUNNING = ["postgres", "redis", "hapi", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                "airflow-triggerer", "airflow-worker"]


def _dockerfile_bases(service: dict) -> list[str]:
    build = service.get("build")
    if not build:
        return []
    text = (ROOT / build.get("context", ".") / build["dockerfile"]).read_text()
    return re.findall(r"^FROM\s+(\S+)", text, flags=re.M)


def test_every_service_of_the_stack_is_there():
    assert set(LONG_RUNNING) | {"airflow-init"} <= set(SERVICES)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_images_are_pinned(name):
    service = SERVICES[name]
    images = [service["image"]] if "build" not in service else _dockerfile_bases(service)
    assert images, f"{name} has neither an image nor a Dockerfile with FROM"
    for image in images:
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image} is not pinned"


def test_hapi_and_airflow_base_images_are_the_chosen_versions():
    assert "hapiproject/hapi:v8.8.0-1" in _dockerfile_bases(SERVICES["hapi"])
    assert "apache/airflow:3.3.2-python3.11" in _dockerfile_bases(SERVICES["airflow-scheduler"])


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_health_checks(name):
    check = SERVICES[name].get("healthcheck")
    assert check and check["test"] and check["test"][0] in ("CMD", "CMD-SHELL")


def test_hapi_health_probe_is_shipped_in_its_image():
    # The official image is distroless: the probe must be a class our Dockerfile compiles and copies in.
    test = SERVICES["hapi"]["healthcheck"]["test"]
    assert test[1] == "java" and "HealthCheck" in test
    assert "COPY --from=probe" in (ROOT / "docker" / "hapi.Dockerfile").read_text()
    assert (ROOT / "docker" / "HealthCheck.java").exists()


@pytest.mark.parametrize("name", [n for n in SERVICES if n.startswith("airflow-")])
def test_airflow_services_wait_for_their_dependencies(name):
    deps = SERVICES[name]["depends_on"]
    for needed in ("postgres", "redis"):
        assert deps[needed]["condition"] == "service_healthy"
    if name != "airflow-init":
        assert deps["hapi"]["condition"] == "service_healthy"
        assert deps["airflow-init"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", [n for n in SERVICES if n.startswith("airflow-")])
def test_airflow_is_celery_and_uses_the_project_image(name):
    env = SERVICES[name]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert SERVICES[name]["image"].startswith("leukofhir-airflow")
    assert "./dags:/opt/airflow/dags:ro" in SERVICES[name]["volumes"]


def test_hapi_runs_on_postgres_with_the_projects_settings():
    env = SERVICES["hapi"]["environment"]
    assert env["SPRING_DATASOURCE_URL"].startswith("jdbc:postgresql://postgres:")
    assert env["HIBERNATE_DIALECT"].endswith("HapiFhirPostgresDialect")
    assert env["hapi.fhir.bulk_export_enabled"] == "true"
    assert SERVICES["hapi"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_fhir_connection_points_at_the_hapi_service():
    conn = json.loads(SERVICES["airflow-worker"]["environment"]["AIRFLOW_CONN_FHIR_DEFAULT"])
    assert conn["conn_type"] == "fhir"
    assert conn["host"].startswith("http://hapi:8080/fhir")


def test_ports_are_published_on_loopback_only():
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
