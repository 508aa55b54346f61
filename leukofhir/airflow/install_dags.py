"""`leukofhir install-dags DAGS_FOLDER`: the one file a site puts in its Airflow dags folder. It only imports the DAGs
the package ships (leukofhir.airflow.dags), so upgrading the package upgrades the DAGs and the folder holds no copy."""

from __future__ import annotations

import os
from pathlib import Path

from leukofhir.errors import OutputError, UsageError

DAG_FILE_NAME = "leukofhir_dags.py"
# Module of leukofhir.airflow.dags → the DAG it defines at module level (Airflow collects a file's module-level DAGs,
# imported ones included, and records this file as their source).
SHIPPED_DAGS = {
    "leukopenia_backfill": "backfill",
    "leukopenia_patients": "patients",
    "leukopenia_surveillance": "surveillance",
}


def dag_file_text() -> str:
    """The DAG file: a docstring and one import per shipped DAG (its text names both "airflow" and "dag", which
    Airflow's safe mode looks for before it parses a file)."""
    imports = "".join(
        f"from leukofhir.airflow.dags.{module} import {name}  # noqa: F401\n" for module, name in SHIPPED_DAGS.items()
    )
    return (
        '"""leukofhir\'s Airflow DAGs, defined in the installed leukofhir package; written by `leukofhir '
        'install-dags`."""\n\n' + imports
    )


def install_dags(folder: str | os.PathLike, *, force: bool = False) -> tuple[Path, bool]:
    """Write the DAG file into `folder`: (its path, whether it changed). A different file of the same name (a site's
    own edit) is kept unless `force`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(
            f"{folder} is not a folder: give the Airflow dags folder (`airflow config get-value core dags_folder`)"
        )
    target = folder / DAG_FILE_NAME
    text = dag_file_text()
    try:
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            return target, False
        if current is not None and not force:
            raise UsageError(
                f"{target} exists and differs from the file leukofhir writes: keep it, or replace it with --force"
            )
        partial = target.with_name(f".{DAG_FILE_NAME}.partial")  # no dot-file is parsed, and the rename is atomic
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target, True


def install_dags_command(args) -> int:
    target, changed = install_dags(args.folder, force=args.force)
    print(f"{'wrote' if changed else 'unchanged:'} {target} (DAGs {', '.join(SHIPPED_DAGS)})")
    return 0
