"""docker-compose.yml checked statically (no Docker engine runs here): services, pinned images, health, wiring."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
LONG_RUNNING = [
    "postgres",
    "redis",
    "hapi",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
]


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


# --- secrets (issue 8.7) ----------------------------------------------------------------------------------------

RAW = (ROOT / "docker-compose.yml").read_text()
SECRETS = ["POSTGRES_PASSWORD", "HAPI_DB_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET"]
_INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")


def _env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_every_secret_is_required_with_no_default():
    uses = _INTERPOLATION.findall(RAW)
    for name in SECRETS:
        forms = [rest for var, rest in uses if var == name]
        assert forms, f"{name} is not used"
        # `${VAR:?message}`: compose refuses to start when VAR is unset or empty (no `:-default`, no bare ${VAR}).
        assert all(rest.startswith(":?") for rest in forms), f"{name} has a default or may be empty: {forms}"
    for var, rest in uses:
        if re.search("PASSWORD|SECRET|KEY|TOKEN", var):
            assert var in SECRETS and rest.startswith(":?"), f"{var} is a secret with a default"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_secret_is_written_into_the_file(service):
    env = SERVICES[service].get("environment") or {}
    for key, value in env.items():
        if re.search("PASSWORD|SECRET|FERNET", key):
            assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), f"{service}: {key} is not a required variable"
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
        if key in env:
            assert "${POSTGRES_PASSWORD:?" in env[key]


def test_hapis_database_password_is_one_variable_for_postgres_init_and_hapi():
    hapi_side = SERVICES["hapi"]["environment"]["SPRING_DATASOURCE_PASSWORD"]
    init_side = SERVICES["postgres"]["environment"]["HAPI_DB_PASSWORD"]
    assert hapi_side == init_side and hapi_side.startswith("${HAPI_DB_PASSWORD:?")
    (mount,) = [v for v in SERVICES["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    script = (ROOT / mount.split(":")[0]).read_text()
    assert '"$HAPI_DB_PASSWORD"' in script and ":'hapi_password'" in script
    assert not re.search(r"PASSWORD\s+'", script), "a literal password in the init script"
    assert not (ROOT / "docker" / "postgres-init.sql").exists()


def test_env_example_lists_each_secret_empty_with_how_to_generate_it():
    example = _env_example()
    assert set(example) == set(SECRETS)
    assert all(value == "" for value in example.values()), "no sample values: they would end up in use"
    text = (ROOT / ".env.example").read_text()
    assert "Fernet.generate_key()" in text and "secrets.token_urlsafe" in text
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert "cp .env.example .env" in (ROOT / "README.md").read_text()


# --- what the Celery stack needs (issue 11) ---------------------------------------------------------------------


def test_the_celery_result_backend_names_the_psycopg2_driver():
    # SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg (v3), which the image does not install (apache/airflow
    # PR #62159): both URLs name psycopg2, which it does.
    env = SERVICES["airflow-worker"]["environment"]
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")


def test_init_creates_the_fhir_server_pool_the_dags_use():
    from leukofhir.airflow.tasks import FHIR_POOL

    command = " ".join(SERVICES["airflow-init"]["command"])
    steps = [step.strip() for step in command.split("&&")]
    assert "airflow db migrate" in steps[0]
    (pool,) = [step for step in steps if step.startswith("airflow pools set")]
    assert pool.split()[3] == FHIR_POOL and int(pool.split()[4]) >= 1
    assert steps.index(pool) > 0  # after the migration
