-- A second database on the same PostgreSQL for HAPI; Airflow's own is created by POSTGRES_DB.
CREATE USER hapi WITH PASSWORD 'hapi';
CREATE DATABASE hapi OWNER hapi;
