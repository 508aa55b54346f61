"""The DAG `leukopenia_surveillance`, defined in the leukofhir package
(leukofhir/airflow/dags/leukopenia_surveillance.py).
A site's dags folder gets the same import from `leukofhir install-dags`."""

from leukofhir.airflow.dags.leukopenia_surveillance import surveillance  # noqa: F401
