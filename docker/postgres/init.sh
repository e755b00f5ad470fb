#!/bin/bash
# One database and owner per component, created on the first start of the postgres volume.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE USER airflow WITH PASSWORD '${AIRFLOW_DB_PASSWORD}';
CREATE DATABASE airflow OWNER airflow;
CREATE USER mlflow WITH PASSWORD '${MLFLOW_DB_PASSWORD}';
CREATE DATABASE mlflow OWNER mlflow;
CREATE USER adfilter WITH PASSWORD '${ADFILTER_DB_PASSWORD}';
CREATE DATABASE adfilter OWNER adfilter;
SQL
