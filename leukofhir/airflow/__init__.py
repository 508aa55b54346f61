"""What leukofhir gives Airflow: the pipeline's DAGs (`leukofhir.airflow.dags`), shipped in the package."""
