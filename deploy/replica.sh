#!/bin/sh
# The compose read replica (profile `replicas`): on its first start a base backup of the primary
# `db` with -R (standby.signal + primary_conninfo), then PostgreSQL as a hot standby streaming
# from it. Every wait has a deadline; a failed backup leaves the volume empty for the next try.
set -eu
: "${PGDATA:?}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  tries=0
  until pg_isready -h db -p 5432 -q; do
    tries=$((tries + 1))
    [ "$tries" -lt 120 ] || { echo "primary db not ready after 120 s" >&2; exit 1; }
    sleep 1
  done
  if ! gosu postgres env PGPASSWORD="$(cat "$REPLICATION_PASSWORD_FILE")" PGCONNECT_TIMEOUT=10 \
      pg_basebackup -h db -p 5432 -U replicator -D "$PGDATA" -R -X stream -c fast --no-password; then
    find "$PGDATA" -mindepth 1 -delete
    exit 1
  fi
fi
# hot_standby_feedback: the primary keeps rows a replica's running read still needs, so replay
# seldom cancels a read (at the price of some bloat on the primary while reads run long).
exec docker-entrypoint.sh postgres -c hot_standby_feedback=on
