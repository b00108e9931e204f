#!/bin/sh
# Creates one role and one database each for SparsePilot's state, MLflow and Prefect.
#
# The postgres image runs this once, on an empty data volume (/docker-entrypoint-initdb.d). It is also
# safe to run again by hand (every statement checks first), and the native stack test runs this very
# file against its throwaway cluster. Passwords come from the environment, never from this file.
#
# Needs: POSTGRES_USER (a superuser), SPARSEPILOT_DB_PASSWORD, MLFLOW_DB_PASSWORD, PREFECT_DB_PASSWORD.
# Connection: psql's usual PGHOST/PGPORT (the image's init phase uses its local socket).
set -eu

: "${POSTGRES_USER:?POSTGRES_USER is required}"
: "${SPARSEPILOT_DB_PASSWORD:?SPARSEPILOT_DB_PASSWORD is required (see .env.example)}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is required (see .env.example)}"
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is required (see .env.example)}"

create_role_and_db() {
  # psql variables (:'name') are quoted by psql itself, so a password cannot break out of the literal.
  psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" \
    -v role="$1" -v pw="$2" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'role', :'pw')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'role', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'role', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'role') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'role') \gexec
SQL
  echo "init-databases: role and database '$1' ready"
}

create_role_and_db sparsepilot "$SPARSEPILOT_DB_PASSWORD"
create_role_and_db mlflow "$MLFLOW_DB_PASSWORD"
create_role_and_db prefect "$PREFECT_DB_PASSWORD"
