#!/bin/sh
# Make the compose secrets once: random passwords and an admin key, readable only by you.
set -eu
cd "$(dirname "$0")/.."
mkdir -p secrets
umask 077
for name in postgres_password memory3_db_password admin_key replication_password; do
  if [ ! -s "secrets/$name" ]; then
    python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > "secrets/$name"
    echo "made secrets/$name"
  fi
done
echo "the admin key is in secrets/admin_key (memory3 tenant create ... reads MEMORY3_ADMIN_KEY_FILE)"
