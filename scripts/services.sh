#!/usr/bin/env bash
# Start the local services the tests talk to, if they are not already up:
# Mosquitto on 127.0.0.1:1883 and PostgreSQL on 127.0.0.1:5432.
set -uo pipefail
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 1883; then
  echo "services: starting mosquitto on 127.0.0.1:1883"
  if [ -f /etc/mosquitto/mosquitto.conf ]; then mosquitto -d -c /etc/mosquitto/mosquitto.conf
  else mosquitto -d -p 1883; fi
  for _ in $(seq 50); do port_open 1883 && break; sleep 0.1; done
fi
if ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql >/dev/null 2>&1; then
    echo "services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 100); do port_open 5432 && break; sleep 0.1; done
  fi
fi
port_open 1883 || { echo "services: mosquitto is not reachable on 127.0.0.1:1883" >&2; exit 4; }
port_open 5432 || echo "services: PostgreSQL is not reachable on 127.0.0.1:5432; PostgreSQL tests will be skipped" >&2
exit 0
