#!/bin/sh
# First start of the compose database: the service's own role (LOGIN, not a superuser), its
# database, and the pgvector extension created here by the superuser so the role needs no more.
set -eu
password="$(cat "$MEMORY3_DB_PASSWORD_FILE")"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -v pw="$password" <<'SQL'
CREATE ROLE memory3 LOGIN PASSWORD :'pw' NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE DATABASE memory3 OWNER memory3;
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname memory3 -c "CREATE EXTENSION IF NOT EXISTS vector"
