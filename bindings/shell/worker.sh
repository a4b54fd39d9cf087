#!/bin/sh
# The sqlite3-shell client of the cross-client tests (tests/clients.rs); the
# same protocol as examples/src/bin/worker.rs, driving the system `sqlite3`.
#
#   sh worker.sh load|stock DB CMD [N]     (load: .load $WRITELOCK_PATH, then .open DB)
#
# CMD: status | hold | try | write N. Rows go to t(client, i, ts); client is
# $WORKER_TAG (default "shell"). The shell's errors go to stdout too.
# write prints "writing" after its first commit.
set -eu
mode=$1 db=$2 cmd=$3 n=${4:-0}
tag=${WORKER_TAG:-shell}
ts="(julianday('now') - 2440587.5) * 86400000.0"

set -- -batch -noheader -list
case $mode in
load) set -- "$@" -cmd ".load $WRITELOCK_PATH" ;;
stock) ;;
*) echo "usage: worker.sh load|stock DB CMD [N]" >&2; exit 2 ;;
esac
set -- "$@" -cmd ".open $db"

{
  echo "SELECT 'sqlite_version=' || sqlite_version();"
  echo "SELECT 'status=' || writelock_status();"
  case $cmd in
  status) ;;
  hold)
    echo ".timeout 5000"
    echo "BEGIN IMMEDIATE;"
    echo "INSERT INTO t(client, i, ts) VALUES ('$tag', 0, $ts);"
    echo ".print holding"
    read -r _ || true
    echo "COMMIT;"
    echo ".print committed"
    ;;
  try)
    echo ".timeout 200"
    echo "INSERT INTO t(client, i, ts) VALUES ('$tag', 0, $ts);"
    echo "SELECT 'ok' WHERE changes() = 1;"
    ;;
  write)
    echo ".timeout 20000"
    i=0
    while [ "$i" -lt "$n" ]; do
      echo "BEGIN IMMEDIATE; INSERT INTO t(client, i, ts) VALUES ('$tag', $i, $ts); COMMIT;"
      [ "$i" = 0 ] && echo ".print writing"
      i=$((i + 1))
    done
    echo ".print done=$n"
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
  esac
} | sqlite3 "$@" 2>&1 || [ "$mode" = stock ] || [ "$cmd" = try ]
# The exit status is the shell's, except where an error is the expected
# outcome: stock (no writelock_status()) and try ("database is locked").
