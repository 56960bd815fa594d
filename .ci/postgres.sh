#!/usr/bin/env bash
# Installs PostgreSQL from Debian's packages, starts it on localhost and creates the
# database the shared-study tests use. Prints the URL to use as KD_TEST_POSTGRES_URL.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /etc/postgresql | sort -n | tail -1)
pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'kd'\"" >/dev/null
su postgres -c "psql -q -tc \"SELECT 1 FROM pg_database WHERE datname='kd_test'\"" | grep -q 1 \
  || su postgres -c "createdb kd_test"
echo "postgresql://postgres:kd@127.0.0.1:5432/kd_test"
