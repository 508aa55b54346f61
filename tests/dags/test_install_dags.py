"""The DAGs ship in the package: `leukofhir install-dags` writes the one file a site's dags folder needs, Airflow finds
the three DAGs through it, and the repository's dags/ imports the same DAG objects."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

from leukofhir.airflow.install_dags import DAG_FILE_NAME, SHIPPED_DAGS, dag_file_text, install_dags
from leukofhir.errors import UsageError

PACKAGE_DAGS = ROOT / "leukofhir" / "airflow" / "dags"


def _imports(path) -> set[tuple[str, str]]:
    return {
        (node.module, alias.name)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def test_the_dag_file_imports_every_dag_module_the_package_ships():
    modules = {p.stem for p in PACKAGE_DAGS.glob("*.py")} - {"__init__"}
    assert set(SHIPPED_DAGS) == modules
    # Each name imported is the DAG its module defines at module level.
    for module, name in SHIPPED_DAGS.items():
        assigned = {
            t.id
            for node in ast.parse((PACKAGE_DAGS / f"{module}.py").read_text()).body
            if isinstance(node, ast.Assign)
            for t in node.targets
        }
        assert name in assigned, f"{module}.py defines no module-level {name}"


def test_the_repository_dags_import_what_a_site_gets(tmp_path):
    path, _ = install_dags(tmp_path)
    repository = set().union(*(_imports(p) for p in (ROOT / "dags").glob("*.py")))
    assert repository == _imports(path)


def test_airflow_finds_the_three_dags_through_the_one_file(tmp_path, airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    path, changed = install_dags(tmp_path)
    assert changed and path == tmp_path / DAG_FILE_NAME
    bag = DagBag(str(tmp_path))
    assert bag.import_errors == {}
    assert set(bag.dags) == set(SHIPPED_DAGS)
    # The written file is their source in Airflow (what the UI shows and what a worker parses again).
    assert {dag.fileloc for dag in bag.dags.values()} == {str(path)}


def test_a_second_install_changes_nothing_and_a_local_edit_is_kept_unless_forced(tmp_path):
    path, _ = install_dags(tmp_path)
    assert install_dags(tmp_path) == (path, False)
    path.write_text(dag_file_text().replace("from leukofhir.airflow.dags.leukopenia_patients", "# from"))
    with pytest.raises(UsageError, match="--force"):
        install_dags(tmp_path)
    assert "# from" in path.read_text()
    assert install_dags(tmp_path, force=True) == (path, True)
    assert path.read_text() == dag_file_text()


def test_the_command_needs_an_existing_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "leukofhir.cli", "install-dags", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "is not a folder" in done.stderr and "dags_folder" in done.stderr
    assert not (tmp_path / "missing").exists()
