#!/bin/sh
# Creates one role and one database each for SparsePilot's state, MLflow and Prefect, plus the state
# DB's app role (sparsepilot_app: may connect, owns nothing; `sparsepilot init`, run as the owner role
# sparsepilot, grants it exactly the app's table privileges: docs/operations.md, "Database roles").
# No role but the superuser may connect to the maintenance database or create large objects in the state
# DB. Every password must be URL-safe (it goes into a database URL): anything else is refused.
#
# The postgres image runs this once, on an empty data volume (/docker-entrypoint-initdb.d). It is also
# safe to run again by hand (every statement checks first), and the native stack test runs this very
# file against its throwaway cluster. Passwords come from the environment, never from this file.
#
# Needs: POSTGRES_USER (a superuser), SPARSEPILOT_DB_PASSWORD, SPARSEPILOT_APP_DB_PASSWORD,
# MLFLOW_DB_PASSWORD, PREFECT_DB_PASSWORD.
# Connection: psql's usual PGHOST/PGPORT (the image's init phase uses its local socket).
set -eu

: "${POSTGRES_USER:?POSTGRES_USER is required}"
: "${SPARSEPILOT_DB_PASSWORD:?SPARSEPILOT_DB_PASSWORD is required (see .env.example)}"
: "${SPARSEPILOT_APP_DB_PASSWORD:?SPARSEPILOT_APP_DB_PASSWORD is required (see .env.example)}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is required (see .env.example)}"
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is required (see .env.example)}"

# Every one of these passwords goes into a database URL (docker-compose.yml): a raw '@' there makes the
# driver read the password's tail as the host and print it ("failed to resolve host 'tail@postgres'"),
# a '%' is read as an escape and the sign-in fails. Refused here, before any role is made.
for var in SPARSEPILOT_DB_PASSWORD SPARSEPILOT_APP_DB_PASSWORD MLFLOW_DB_PASSWORD PREFECT_DB_PASSWORD; do
  eval "value=\$$var"
  case "$value" in
    *[!A-Za-z0-9._~-]*)
      echo "init-databases: $var must be URL-safe (letters, digits and . _ ~ - only; it goes into a" \
        "database URL): use hex, e.g. openssl rand -hex 24 (docs/operations.md, \"Start\")" >&2
      exit 2 ;;
  esac
done

create_role_and_db() {
  # psql variables (:'name') are quoted by psql itself, so a password cannot break out of the literal.
  psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" \
    -v role="$1" -v pw="$2" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'role', :'pw')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'role', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L TEMPLATE template0', :'role', :'role', 'UTF8')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'role') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'role') \gexec
SQL
  echo "init-databases: role and database '$1' ready"
}

create_role_and_db sparsepilot "$SPARSEPILOT_DB_PASSWORD"
psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" \
  -v pw="$SPARSEPILOT_APP_DB_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE sparsepilot_app LOGIN PASSWORD %L', :'pw')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sparsepilot_app') \gexec
SELECT format('ALTER ROLE sparsepilot_app LOGIN PASSWORD %L', :'pw') \gexec
GRANT CONNECT ON DATABASE sparsepilot TO sparsepilot_app;
SQL
echo "init-databases: app role 'sparsepilot_app' ready (table privileges: sparsepilot init)"
# Owning nothing includes large objects: every role may create them through these functions by default
# (storage outside every table and its guards). SparsePilot uses none. Per database: the state DB's.
psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname sparsepilot <<'SQL'
REVOKE EXECUTE ON FUNCTION lo_create(oid), lo_creat(integer), lo_from_bytea(oid, bytea), lo_import(text),
  lo_import(text, oid) FROM PUBLIC;
SQL
# The maintenance databases (postgres, and POSTGRES_DB where the image made one) are for the superuser:
# no other role may connect to them or make temporary tables there.
psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
SELECT format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', datname) FROM pg_database
 WHERE datname IN ('postgres', current_database())
   AND datname NOT IN ('sparsepilot', 'mlflow', 'prefect') \gexec
SQL
create_role_and_db mlflow "$MLFLOW_DB_PASSWORD"
create_role_and_db prefect "$PREFECT_DB_PASSWORD"
