"""What leukofhir gives Airflow: the DAGs (shipped in the package), their tasks, the `fhir` connection and its form."""
