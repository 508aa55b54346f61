"""The DAG definitions, shipped in the wheel: a DAG file in a site's dags folder imports them (`leukofhir install-dags`)."""
