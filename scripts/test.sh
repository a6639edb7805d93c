#!/usr/bin/env bash
# The project's one test command (the README's, and .ci/run's): makes sure a PostgreSQL server's
# binaries (initdb, pg_ctl, postgres) are on this machine, installing Debian's `postgresql` from
# the OS packages when they are missing, then runs the whole suite on the default outbox
# (SQLite) and the black-box tests again on PostgreSQL. With arguments it runs `cargo test` with
# them, once (`bash scripts/test.sh --test postgres_storage` runs one test binary;
# `CHANNEL_GATEWAY_TEST_BACKEND=postgres` picks the backend of that run).
#
# The PostgreSQL tests start their own throwaway cluster (tests/pg/mod.rs: initdb in a temp dir,
# a free port on 127.0.0.1, as an unprivileged user when run as root). Neither this script nor
# the tests start, stop or connect to a system cluster; if installing the package created and
# started one, it is left as it is and nothing here uses it.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "scripts/test.sh: $*" >&2
  exit 1
}

has_server() {
  [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ] && [ -x "$1/postgres" ]
}

# The same search as tests/pg/mod.rs: $CHANNEL_GATEWAY_TEST_PG_BIN, then the directory `initdb`
# on PATH really lives in (Debian puts no initdb on PATH; a symlink to one may), then the highest
# version under /usr/lib/postgresql.
find_server() {
  if [ -n "${CHANNEL_GATEWAY_TEST_PG_BIN:-}" ]; then
    echo "$CHANNEL_GATEWAY_TEST_PG_BIN"
    return 0
  fi
  local found dir
  if found=$(command -v initdb 2>/dev/null); then
    dir=$(dirname "$(readlink -f "$found")")
    if has_server "$dir"; then
      echo "$dir"
      return 0
    fi
  fi
  for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
    if has_server "$dir"; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

install_server() {
  command -v apt-get >/dev/null 2>&1 ||
    die "no PostgreSQL server found (initdb, pg_ctl, postgres) and no apt-get to install one: install your OS's PostgreSQL server package, then put its bin directory on PATH or in CHANNEL_GATEWAY_TEST_PG_BIN"
  local -a sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 ||
      die "no PostgreSQL server found, and installing one needs root: run 'apt-get install postgresql' as root (there is no sudo here)"
    if sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    elif [ -t 0 ]; then
      sudo=(sudo)
    else
      die "no PostgreSQL server found, and sudo needs a password with no terminal to ask on: run 'sudo apt-get install postgresql' first"
    fi
  fi
  echo "== installing PostgreSQL's server from the OS packages (apt-get install postgresql); the tests start their own clusters and never use a system one"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
    die "apt-get update failed"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql ||
    die "apt-get install postgresql failed"
}

if [ -n "${CHANNEL_GATEWAY_TEST_PG_BIN:-}" ] && ! has_server "$CHANNEL_GATEWAY_TEST_PG_BIN"; then
  die "CHANNEL_GATEWAY_TEST_PG_BIN=$CHANNEL_GATEWAY_TEST_PG_BIN has no initdb, pg_ctl and postgres"
fi
if ! dir=$(find_server); then
  install_server
  dir=$(find_server) ||
    die "installed the postgresql package but found no initdb, pg_ctl and postgres (looked on PATH and in /usr/lib/postgresql/*/bin)"
fi

# initdb refuses to run as root: the tests then run the server as `postgres` (or `nobody`) with
# runuser or setpriv, both in util-linux, which every Debian has.
if [ "$(id -u)" -eq 0 ] && ! command -v runuser >/dev/null 2>&1 && ! command -v setpriv >/dev/null 2>&1; then
  die "running as root, but neither runuser nor setpriv (util-linux) is here to run PostgreSQL as an unprivileged user"
fi

export CHANNEL_GATEWAY_TEST_PG_BIN="$dir"
echo "== PostgreSQL for the tests: $("$dir/postgres" --version) ($dir)"
if [ "$#" -gt 0 ] || [ -n "${CHANNEL_GATEWAY_TEST_BACKEND:-}" ]; then
  # A chosen subset, or a chosen backend: one run.
  echo "== cargo test $* (outbox backend: ${CHANNEL_GATEWAY_TEST_BACKEND:-sqlite})"
  exec cargo test "$@"
fi
# The whole suite on the default outbox (SQLite), then the black-box suite (every integration
# test: order, batches, faults, crashes, idempotency, inbound, ...) again on PostgreSQL.
echo "== cargo test (outbox backend: sqlite)"
cargo test
# The test binaries that always use PostgreSQL (postgres_*, replicas*) ran in the first pass.
tests=()
for f in tests/*.rs; do
  name=$(basename "$f" .rs)
  case "$name" in
    postgres_* | replicas*) ;;
    *) tests+=(--test "$name") ;;
  esac
done
echo "== cargo test ${tests[*]} (outbox backend: postgres)"
CHANNEL_GATEWAY_TEST_BACKEND=postgres cargo test "${tests[@]}"

