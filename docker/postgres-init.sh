#!/usr/bin/env bash
# A second database on the same PostgreSQL for HAPI (Airflow's own is created by POSTGRES_DB). Its password is
# HAPI_DB_PASSWORD, the variable HAPI's datasource uses too; psql quotes it (:'var'), so any character is safe.
set -euo pipefail
: "${HAPI_DB_PASSWORD:?HAPI_DB_PASSWORD is not set}"
psql -v ON_ERROR_STOP=1 -v hapi_password="$HAPI_DB_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE USER hapi WITH PASSWORD :'hapi_password';
CREATE DATABASE hapi OWNER hapi;
SQL
