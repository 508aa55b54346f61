"""The DAG definitions, shipped in the wheel; a site's dags folder imports them (`leukofhir install-dags`)."""
