"""Packaging for an existing Airflow: the built wheel installs into a fresh venv against the lock, and there the hook,
the provider metadata, every DAG file, the GX suites and the demo's sample (inside the wheel) work, from outside the
checkout. (tests/matrix installs it beside the oldest and the newest Airflow instead of the lock.)

Also checked without building: every third-party module the package and the DAGs import is a declared dependency,
each declared range has a floor and no upper bound without a known break, and the lock pins a version inside it."""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from conftest import EXTERNAL, ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DECLARED = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
LOCK = {
    canonicalize_name(name): version
    for name, _, version in (
        line.partition("==") for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line
    )
}


def _third_party_imports(folders) -> set[str]:
    modules = set()
    for folder in folders:
        for path in Path(folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"leukofhir", "__future__"}


def test_every_imported_module_is_a_declared_dependency():
    providers = packages_distributions()
    for module in sorted(_third_party_imports([ROOT / "leukofhir", ROOT / "dags"])):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if module == "airflow":
            dists = {"apache-airflow"}  # the distribution users install; its parts provide the module
        assert dists & set(DECLARED), f"`import {module}` but none of {sorted(dists)} is in pyproject dependencies"


def test_declared_ranges_have_floors_no_cap_without_a_known_break_and_hold_the_locked_versions():
    lines = {
        line.strip().split('"')[1]: line
        for line in (ROOT / "pyproject.toml").read_text().splitlines()
        if line.strip().startswith('"') and any(line.strip()[1:].startswith(r.name) for r in DECLARED.values())
    }
    for name, requirement in DECLARED.items():
        assert name in LOCK, f"{name} is declared but not pinned in requirements.lock"
        assert requirement.specifier.contains(LOCK[name]), f"lock pins {name}=={LOCK[name]} outside {requirement}"
        operators = [s.operator for s in requirement.specifier]
        assert operators.count(">=") == 1, f"{requirement}: one floor (>=), the oldest version tested"
        if set(operators) - {">="}:  # a cap, a pin or an exclusion keeps sites off versions: only for a known break
            assert "known break" in lines[str(requirement)], f"{requirement}: a bound without a `# known break: …`"


@functools.cache
def _built_wheel() -> Path:
    """The wheel built from this checkout (once per session)."""
    dist = Path(tempfile.mkdtemp(prefix="leukofhir-wheel-"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            "-w",
            str(dist),
            str(ROOT),
        ],
        check=True,
        timeout=900,
        capture_output=True,
    )
    (wheel,) = dist.glob("leukofhir-*.whl")
    return wheel


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """The wheel built from this checkout, installed with its dependencies into a new venv, constrained by the lock."""
    work = tmp_path_factory.mktemp("packaging")
    wheel = _built_wheel()
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    installed = subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
            str(ROOT / "requirements.lock"),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def _run(venv, code, cwd, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LEUKOFHIR_", "PYTHON"))}
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(clean, **env),
    )


@pytest.mark.packaging
def test_the_fresh_venv_holds_only_locked_versions(fresh_venv):
    frozen = subprocess.run(
        [str(fresh_venv / "bin" / "pip"), "freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for line in frozen:
        name, _, version = line.split(" @ ")[0].partition("==")
        if canonicalize_name(name) in ("leukofhir", "pip", "setuptools"):
            continue
        assert LOCK.get(canonicalize_name(name)) == version, f"{line} is not the locked version"


@pytest.mark.packaging
def test_the_wheel_holds_the_dags_the_suites_and_the_demo_sample():
    wheel = _built_wheel()
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    shipped = {f"leukofhir/airflow/dags/{p.name}" for p in (ROOT / "leukofhir" / "airflow" / "dags").glob("*.py")}
    assert len(shipped) == 4 and shipped <= names  # __init__ and the three DAGs
    assert {f"leukofhir/expectations/{n}.json" for n in ("observations", "exposures", "flags")} <= names
    sample = {n for n in names if n.startswith("leukofhir/sample_data/")}
    assert len([n for n in sample if n.endswith(".json.gz")]) == 5 and "leukofhir/sample_data/README.md" in sample
    assert not any(n.startswith(("dags/", "tests/", "scripts/")) for n in names)


@pytest.mark.packaging
def test_hook_provider_and_dags_import_from_the_installed_wheel(fresh_venv, tmp_path):
    dag_files = sorted(str(p) for p in (ROOT / "dags").glob("*.py"))
    code = f"""
import importlib.util, json, sys
from importlib.metadata import entry_points
import leukofhir, leukofhir.airflow.hook
assert "site-packages" in leukofhir.__file__, leukofhir.__file__
(ep,) = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("leukofhir.")]
info = ep.load()()
assert info["connection-types"][0]["hook-class-name"] == "leukofhir.airflow.hook.FhirHook"
from leukofhir.airflow.hook import FhirHook
assert FhirHook.conn_type == "fhir"
from airflow.sdk import DAG
dags = 0
for path in {dag_files!r}:
    spec = importlib.util.spec_from_file_location("dag_" + str(abs(hash(path))), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dags += sum(isinstance(v, DAG) for v in vars(module).values())
print(json.dumps({{"dag_files": {len(dag_files)}, "dags": dags}}))
"""
    done = _run(fresh_venv, code, cwd=tmp_path, AIRFLOW_HOME=str(tmp_path / "airflow"))
    assert done.returncode == 0, done.stderr[-3000:]
    counts = done.stdout.strip().splitlines()[-1]
    assert f'"dag_files": {len(dag_files)}' in counts
    if dag_files:  # every DAG file defines at least one DAG once the pipeline's DAGs are merged
        assert '"dags": 0' not in counts


@pytest.mark.packaging
def test_evaluate_from_the_wheel_finds_the_suites_inside_it(fresh_venv, tmp_path):
    bundle = sorted((EXTERNAL / "smart-generated-sample-data-R4-synthea" / "bundles").glob("*.json.gz"))[0]
    where = _run(fresh_venv, "from leukofhir.evaluate.validate import EXPECTATIONS_DIR as d; print(d)", cwd=tmp_path)
    suites = Path(where.stdout.strip())
    assert "site-packages" in str(suites) and sorted(p.name for p in suites.glob("*.json")) == [
        "exposures.json",
        "flags.json",
        "observations.json",
    ]
    done = subprocess.run(
        [str(fresh_venv / "bin" / "leukofhir"), "evaluate", str(bundle), "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("LEUKOFHIR_")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "Flag.ndjson").exists() and (tmp_path / "out" / "report.json").exists()


@pytest.mark.packaging
def test_demo_outside_a_checkout_says_what_it_needs(fresh_venv, tmp_path):
    done = subprocess.run(
        [str(fresh_venv / "bin" / "leukofhir"), "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=_clean_env(),
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "give --fhir-url of a running FHIR R4 server" in done.stderr and "source checkout" in done.stderr
    assert "site-packages" not in done.stderr  # no path into the install for the user to chase


@pytest.mark.packaging
@pytest.mark.fhir
def test_demo_from_the_wheel_runs_on_a_given_server(fresh_venv, fhir_base_url, tmp_path):
    """The sample patients and the DAGs travel in the wheel: with --fhir-url the demo needs nothing else."""
    done = subprocess.run(
        [str(fresh_venv / "bin" / "leukofhir"), "demo", "--fhir-url", fhir_base_url, "--out", str(tmp_path / "demo")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        env=_clean_env(AIRFLOW__CORE__LOAD_EXAMPLES="False"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "loading 5 Synthea patient bundles" in done.stdout and "patients evaluated" in done.stdout
    assert "read back from" in done.stdout and "(Flag/" in done.stdout
    assert (tmp_path / "demo" / "airflow" / "dags" / "leukofhir_dags.py").exists()


def _clean_env(**extra) -> dict:
    return dict({k: v for k, v in os.environ.items() if not k.startswith(("LEUKOFHIR_", "PYTHON", "AIRFLOW"))}, **extra)
