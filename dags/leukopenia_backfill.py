"""The DAG `leukopenia_backfill`, defined in the leukofhir package (leukofhir/airflow/dags/leukopenia_backfill.py).
A site's dags folder gets the same import from `leukofhir install-dags`."""

from leukofhir.airflow.dags.leukopenia_backfill import backfill  # noqa: F401
