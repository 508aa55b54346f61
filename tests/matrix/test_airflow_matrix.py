"""Into the Airflow a site already runs, oldest and newest: the wheel goes in by docs "Installing into an existing
Airflow", step by step (the commands read from the page), without moving Airflow or anything else the site had;
then the provider, the `fhir` connection type, the DAGs deployed and parsed, each form of the connection tested, and
one `airflow dags test leukopenia_backfill` that writes the Synthea sample's Flags to the real HAPI server.

- oldest: Airflow 3.2.0 with every dependency at the floor pyproject.toml declares, installed as the site's
  environment before leukofhir comes (so the floors are what runs);
- newest: the lock's Airflow, the rest as pip resolves it beside that Airflow today.

`make test-airflow-matrix` runs this module (marker airflow_matrix; `make test` leaves it out). Each venv is built
once; pip's cache serves the second one the wheels the first downloaded."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import EXTERNAL, ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from support.install_page import Shell, clean_environ, on_server, steps
from support.server_data import flags_by_identifier, project_flags

pytestmark = [pytest.mark.fhir, pytest.mark.airflow_matrix]

STEPS = steps(ROOT / "docs" / "installing-into-airflow.md")
INSTALL = "Install into the Airflow environment, its Airflow pinned"
SAMPLE = sorted((EXTERNAL / "smart-generated-sample-data-R4-synthea" / "bundles").glob("*.json.gz"))
DAG_IDS = {"leukopenia_backfill", "leukopenia_patients", "leukopenia_surveillance"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DECLARED = [Requirement(r) for r in PROJECT["dependencies"]]
WHEEL = ROOT / "dist" / f"leukofhir-{PROJECT['version']}-py3-none-any.whl"
LOCK = {
    canonicalize_name(n): v
    for n, _, v in (
        line.partition("==") for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line
    )
}


def _floor(requirement: Requirement) -> str:
    (floor,) = [s.version for s in requirement.specifier if s.operator == ">="]
    return floor


OLDEST_AIRFLOW = next(_floor(r) for r in DECLARED if r.name == "apache-airflow")
NEWEST_AIRFLOW = LOCK["apache-airflow"]
# What the site had installed before leukofhir. (Airflow 3.2 needs fastapi<0.137, README: the floor 0.129.0 is.)
SITES = {
    "oldest": [f"{r.name}=={_floor(r)}" for r in DECLARED],
    "newest": [f"apache-airflow=={NEWEST_AIRFLOW}"],
}


def _installed(venv: Path) -> dict[str, str]:
    listed = subprocess.run(
        [str(venv / "bin" / "pip"), "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    return {canonicalize_name(d["name"]): d["version"] for d in json.loads(listed)}


@pytest.fixture(scope="module")
def wheel():
    """Step 1 of the page, in this checkout: the wheel of this version, which step 2 installs."""
    title = f"Build the wheel: dist/{WHEEL.name}"
    assert title in STEPS and f"dist/{WHEEL.name}" in STEPS[INSTALL], f"the page must build and install {WHEEL.name}"
    WHEEL.unlink(missing_ok=True)
    done = subprocess.run(
        ["bash", "-euc", STEPS[title]], cwd=ROOT, capture_output=True, text=True, timeout=900, env=clean_environ()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert WHEEL.exists()
    return WHEEL


class Site:
    """A site's Airflow environment: a venv, an AIRFLOW_HOME with a migrated database and a dags folder, and a shell
    session on it (the venv's bin first on PATH, as an activated venv)."""

    def __init__(self, name: str, folder: Path):
        self.name, self.venv, self.home = name, folder / "venv", folder / "airflow"
        (self.home / "dags").mkdir(parents=True)
        env = clean_environ(
            PATH=f"{self.venv / 'bin'}:{os.environ['PATH']}",
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
        )
        self.shell = Shell(env, cwd=ROOT, state=folder / "shell.env")
        self.before: dict[str, str] = {}
        self.after: dict[str, str] = {}

    def step(self, title: str, base_url: str | None = None, timeout: float = 900) -> str:
        commands = STEPS[title] if base_url is None else on_server(STEPS[title], base_url)
        done = self.shell.run(commands, timeout=timeout)
        assert done.returncode == 0, (
            f"{self.name}: step {title!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        return done.stdout

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=self.home, env=self.shell.env, capture_output=True, text=True, timeout=timeout)

    def json(self, *args: str) -> list:
        """An `airflow … --output json` answer: its last line (Airflow may log to stdout before it)."""
        done = self.run(*args, "--output", "json")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        last = done.stdout.strip().splitlines()[-1]
        return [] if last == "No data found" else json.loads(last)


@pytest.fixture(scope="module", params=list(SITES))
def site(request, wheel, tmp_path_factory):
    """The site's Airflow installed first, then leukofhir by step 2 of the page (with the shell's `airflow version`)."""
    site = Site(request.param, tmp_path_factory.mktemp(f"site-{request.param}"))
    subprocess.run([sys.executable, "-m", "venv", str(site.venv)], check=True, timeout=300)
    started = time.monotonic()
    installed = site.run("pip", "install", "-q", "--disable-pip-version-check", *SITES[request.param], timeout=1800)
    assert installed.returncode == 0, installed.stderr[-3000:]
    migrated = site.run("airflow", "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    site.before = _installed(site.venv)
    site.step(INSTALL, timeout=1800)
    site.after = _installed(site.venv)
    versions = ", ".join(f"{canonicalize_name(r.name)} {site.after.get(canonicalize_name(r.name))}" for r in DECLARED)
    print(
        f"\n{request.param}: Airflow and leukofhir installed in {time.monotonic() - started:.0f} s: {versions}",
        file=sys.stderr,
    )
    return site


def test_installing_leukofhir_moves_neither_airflow_nor_anything_the_site_had(site):
    expected = OLDEST_AIRFLOW if site.name == "oldest" else NEWEST_AIRFLOW
    assert site.before["apache-airflow"] == site.after["apache-airflow"] == expected
    moved = {
        name: (version, site.after.get(name))
        for name, version in site.before.items()
        if site.after.get(name) != version
    }
    assert moved == {}, f"installing leukofhir changed the site's packages: {moved}"
    assert site.after["leukofhir"] == PROJECT["version"]
    if site.name == "oldest":  # the floors are what this environment runs
        floors = {canonicalize_name(r.name): _floor(r) for r in DECLARED}
        assert {n: site.after[n] for n in floors} == floors


def test_the_provider_registers_the_fhir_connection_type(site):
    providers = site.json("airflow", "providers", "list")
    assert "leukofhir" in {p["package_name"] for p in providers}
    hooks = site.json("airflow", "providers", "hooks")
    (fhir,) = [h for h in hooks if h["connection_type"] == "fhir"]
    assert fhir["package_name"] == "leukofhir" and fhir["class"].endswith(".FhirHook")


def test_the_dags_deploy_from_the_wheel_and_parse_without_errors(site):
    site.step("Deploy the DAGs into the dags folder")
    assert [p.name for p in (site.home / "dags").iterdir()] == ["leukofhir_dags.py"]
    listed = site.step("Parse the DAGs now")
    assert all(dag_id in listed for dag_id in DAG_IDS), listed[-3000:]
    assert site.json("airflow", "dags", "list-import-errors") == []
    dags = {d["dag_id"]: d for d in site.json("airflow", "dags", "list")}
    assert set(dags) == DAG_IDS
    assert {Path(d["fileloc"]).name for d in dags.values()} == {"leukofhir_dags.py"}


@pytest.mark.parametrize(
    "form",
    [
        "The connection in URI form: the scheme is the extra `scheme` (https unless it says http)",
        "The connection in JSON form: host may hold the whole base URL",
        "The connection in Airflow's database, as the UI's Admin → Connections → Add (type \"FHIR server\") stores it",
    ],
    ids=["uri", "json", "database"],
)
def test_each_form_of_the_connection_passes_the_connection_test(site, form, fhir_base_url):
    site.step(form, fhir_base_url)
    tested = site.step("Test the connection")
    assert "Connection success!" in tested, tested[-2000:]


def test_the_pool_is_created(site):
    site.step("Create the pool")
    (pool,) = site.json("airflow", "pools", "get", "fhir_server")
    assert str(pool["slots"]) == "4"


def test_a_backfill_from_airflow_dags_test_writes_the_sample_flags(site, fhir_base_url, fhir_client, tmp_path):
    loaded = site.run("leukofhir", "load", "--fhir-url", fhir_base_url, *map(str, SAMPLE))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    # As of now, as the DAG evaluates (clinical-rules v1.3 §4: an open episode lapses 90 days after its last value).
    now = datetime.now(timezone.utc).isoformat()
    offline = site.run("leukofhir", "evaluate", *map(str, SAMPLE), "--out", str(tmp_path / "offline"), "--as-of", now)
    assert offline.returncode == 0, offline.stderr[-3000:]
    expected = flags_by_identifier([json.loads(line) for line in (tmp_path / "offline" / "Flag.ndjson").open()])
    assert expected

    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()
    conf = {"start": "1900-01-01", "end": tomorrow, "window_field": "effective", "chunks": 2}
    log = _dags_test(site, "leukopenia_backfill", conf, tmp_path / "dags-test.log")
    assert "state=success" in log or "DagRun Finished" in log, log[-3000:]
    ids = sorted(json.load(gzip.open(p, "rt"))["entry"][0]["resource"]["id"] for p in SAMPLE)
    assert flags_by_identifier(project_flags(fhir_client, ids)) == expected
    (report,) = (site.home / "leukofhir-runs" / "leukopenia_backfill").glob("*/report.json")
    report = json.loads(report.read_text())
    # The first site writes the Flags, the second finds them written (one server for the whole session, which may
    # hold other tests' patients in the window too).
    counts = report["writes"]
    assert report["reconciled"] and report["patients_touched"] >= len(ids)
    assert counts["create"] + counts["update"] + counts["unchanged"] >= len(expected) and counts["refused"] == 0


def _dags_test(site: Site, dag_id: str, conf: dict, log_path: Path, timeout: float = 1200) -> str:
    """`airflow dags test` that fails at the first failed task: it would otherwise wait out the DAG's retry delays
    (minutes) and, while it waits, ignore SIGTERM; so its process group is killed."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["airflow", "dags", "test", dag_id, "--conf", json.dumps(conf)],
            cwd=site.home,
            env=site.shell.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if "up_for_retry" in log_path.read_text(errors="replace").lower():
                break
            time.sleep(2)
    finally:
        stopped = process.poll() is None
        if stopped:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = log_path.read_text(errors="replace")
    assert not stopped, (
        f"{site.name}: airflow dags test {dag_id}: a task failed (or it ran over {timeout:.0f} s):\n{text[-4000:]}"
    )
    assert process.returncode == 0, f"{site.name}: airflow dags test exited {process.returncode}:\n{text[-4000:]}"
    return text
