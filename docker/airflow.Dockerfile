# Airflow with leukofhir installed into it against the project's own lock (Airflow's constraints file is not used):
# the image's Airflow stays, leukofhir's dependencies resolve within the tested pins.
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root requirements.lock pyproject.toml README.md /opt/leukofhir/
COPY --chown=airflow:root leukofhir /opt/leukofhir/leukofhir
# leukofhir/expectations links here; the build copies the GX suites into the package (they travel with it).
COPY --chown=airflow:root expectations /opt/leukofhir/expectations
RUN pip install --no-cache-dir -c /opt/leukofhir/requirements.lock /opt/leukofhir
