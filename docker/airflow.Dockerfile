# Airflow with leukofhir installed from the project's own lock (Airflow's constraints file is not used).
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root requirements.lock pyproject.toml README.md /opt/leukofhir/
COPY --chown=airflow:root leukofhir /opt/leukofhir/leukofhir
COPY --chown=airflow:root expectations /opt/leukofhir/expectations
RUN pip install --no-cache-dir -r /opt/leukofhir/requirements.lock \
 && pip install --no-cache-dir --no-deps /opt/leukofhir
# The GX suites are the data contract; they live beside the package, not inside it.
ENV LEUKOFHIR_EXPECTATIONS_DIR=/opt/leukofhir/expectations
