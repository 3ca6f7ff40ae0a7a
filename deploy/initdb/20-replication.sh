#!/bin/sh
# First start of the compose primary: what a streaming read replica needs (profile `replicas`,
# deploy/replica.sh). A role `replicator` (LOGIN REPLICATION, not a superuser) whose password is
# the compose secret `replication_password`; replication connections allowed for it with
# scram-sha-256; 512 MB of WAL kept for a replica that falls behind (a replica further behind
# stops streaming: remove its volume and it makes itself again). Harmless without a replica.
set -eu
password="$(cat "$REPLICATION_PASSWORD_FILE")"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -v pw="$password" <<'SQL'
CREATE ROLE replicator LOGIN REPLICATION PASSWORD :'pw' NOSUPERUSER NOCREATEDB NOCREATEROLE;
ALTER SYSTEM SET wal_keep_size = '512MB';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
