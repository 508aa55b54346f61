"""The DAG `leukopenia_patients`, defined in the leukofhir package (leukofhir/airflow/dags/leukopenia_patients.py); a site's dags folder
gets the same import from `leukofhir install-dags`."""

from leukofhir.airflow.dags.leukopenia_patients import patients  # noqa: F401
