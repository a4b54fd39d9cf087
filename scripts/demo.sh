#!/usr/bin/env bash
# scripts/demo.sh — `make demo`: sqlite-writelock in action, in well under 30 s.
#
# For each journal mode (WAL, DELETE) it runs the same workload twice, each in a fresh temp dir:
#   stock      plain `sqlite3` shells (no extension)
#   writelock  `sqlite3 -cmd '.load target/release/libwritelock' -cmd '.open DB'`
# Workload: $WRITERS sqlite3 processes started together, each doing $TX transactions
# `BEGIN IMMEDIATE; INSERT ...; COMMIT;` with `.timeout 10000`.
# Meanwhile, without disturbing them:
#   * a probe samples /proc/locks (no flock -n!) and counts samples in which a writer process
#     holds a FLOCK WRITE lock on <db>.lock;
#   * a "maintenance job" runs `flock <db>.lock sh -c '... sleep 0.3 ...'` (like a backup
#     script); every row records its insert time, so we count rows written while it held the lock.
# Then it prints commits, integrity_check and 'database is locked' errors side by side, and
# exits non-zero if the writelock runs show the extension is not doing its job.
# Needs only bash, sqlite3 (shell), util-linux flock(1), coreutils and awk.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SO="$ROOT/target/release/libwritelock.so"
WRITERS=${WRITERS:-4}
TX=${TX:-150}
[[ -f $SO ]] || { echo "demo: $SO not found — run \`make\` first." >&2; exit 1; }
command -v sqlite3 >/dev/null && command -v flock >/dev/null \
  || { echo "demo: needs the sqlite3 shell and util-linux flock(1)." >&2; exit 1; }
[[ -r /proc/locks ]] || { echo "demo: needs /proc/locks (Linux)." >&2; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/writelock-demo.XXXXXX")
cleanup() { local p; for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { echo "${EPOCHREALTIME/[.,]/}"; }   # microseconds
dbsize() { cat "$1" "$1-wal" 2>/dev/null | wc -c || true; }   # db + WAL bytes; takes no lock
# Insert time in ms since the epoch (same clock as `date +%s%3N`): which rows were written
# while flock(1) held the lock. Stable within a statement; INSERT runs inside the write lock.
TS="CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"

# probe INODE STOPFILE: one line per /proc/locks sample: "s" + pids holding FLOCK WRITE on INODE.
# Lines of blocked waiters ("1: -> FLOCK ...") are skipped: they do not hold the lock.
probe() {
  local ino=$1 stop=$2 _ kind mode pid devino holders
  while [[ ! -e $stop ]]; do
    holders=
    while read -r _ kind _ mode pid devino _; do
      [[ $kind == FLOCK && $mode == WRITE && $devino == *":$ino" ]] && holders+=" $pid"
    done </proc/locks
    echo "s$holders"
    sleep 0.002
  done
}

ROWS=()   # table rows
FAIL=()   # reasons the writelock runs failed

run_case() {  # run_case stock|writelock WAL|DELETE
  local mode=$1 journal=$2 dir="$TMP/$1-$2" db w i t0 pids=() open=()
  mkdir "$dir"; db="$dir/demo.db"
  sqlite3 "$db" "PRAGMA journal_mode=$journal;
    CREATE TABLE t(id INTEGER PRIMARY KEY, writer INT, seq INT, ts INT, pad BLOB);" >/dev/null
  local size0; size0=$(dbsize "$db")
  touch "$db.lock"   # stock never creates it; flock(1) and the probe need it in both runs
  [[ $mode == writelock ]] && open=(-cmd ".load ${SO%.so}")
  open+=(-cmd ".open $db")
  for ((w = 1; w <= WRITERS; w++)); do
    { echo ".timeout 10000"
      for ((i = 1; i <= TX; i++)); do
        echo "BEGIN IMMEDIATE; INSERT INTO t(writer,seq,ts,pad) VALUES($w,$i,$TS,randomblob(200)); COMMIT;"
      done; } >"$dir/w$w.sql"
  done

  printf '%-9s %-6s: %d writers x %d transactions ... ' "$mode" "$journal" "$WRITERS" "$TX"
  probe "$(stat -c %i "$db.lock")" "$dir/stop" >"$dir/probe.log" &
  local probe_pid=$!
  t0=$(now)
  for ((w = 1; w <= WRITERS; w++)); do
    sqlite3 "${open[@]}" <"$dir/w$w.sql" >/dev/null 2>"$dir/w$w.err" &
    pids+=($!)
  done

  # Maintenance job: once the writers are under way (the db/wal files have grown; reading the
  # db here could be starved by the writers), hold <db>.lock with flock(1) for 0.3 s, like a
  # backup script. It prints its window (ms) and whether the db files changed meanwhile;
  # afterwards the rows' insert times (column ts) tell how many were written inside the window.
  local tries=0
  while (($(dbsize "$db") < size0 + 3 * 4096 && tries++ < 300)); do sleep 0.01; done
  local t_req job_out t_got t_rel sum_a sum_b
  t_req=$(date +%s%3N)
  job_out=$(DB=$db flock "$db.lock" sh -c '
      sum() { cat "$DB" "$DB-wal" 2>/dev/null | cksum | tr -d " "; }
      t=$(date +%s%3N); a=$(sum); sleep 0.3; b=$(sum); echo "$t $(date +%s%3N) $a $b"') \
    || { echo "demo: the flock(1) job failed: $job_out" >&2; exit 1; }
  read -r t_got t_rel sum_a sum_b <<<"$job_out"

  local rc=0
  for w in "${pids[@]}"; do wait "$w" || rc=$?; done
  local secs; secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')
  touch "$dir/stop"; wait "$probe_pid"

  local commits integrity errors samples held under after
  commits=$(sqlite3 "$db" 'SELECT count(*) FROM t;' 2>&1 || true)
  under=$(sqlite3 "$db" "SELECT count(*) FROM t WHERE ts > $t_got AND ts < $t_rel;" 2>&1 || true)
  after=$(sqlite3 "$db" "SELECT count(*) FROM t WHERE ts > $t_rel;" 2>&1 || true)
  [[ $after =~ ^[0-9]+$ ]] || after=0
  integrity=$(sqlite3 "$db" 'PRAGMA integrity_check;' 2>&1 | tr '\n' ' ' | sed 's/ $//' || true)
  errors=$(cat "$dir"/w*.err | grep -c 'database is locked' || true)
  samples=$(wc -l <"$dir/probe.log")
  held=$(awk -v pids=" ${pids[*]} " '{ for (i = 2; i <= NF; i++) if (index(pids, " " $i " ")) { n++; break } }
    END { print n + 0 }' "$dir/probe.log")
  echo "${secs}s"
  echo "   flock(1) job: lock granted after $((t_got - t_req)) ms, held $((t_rel - t_got)) ms;" \
    "db files changed meanwhile: $([[ $sum_a == "$sum_b" ]] && echo no || echo yes);" \
    "rows inserted after it let go: $after"
  [[ $rc == 0 ]] || echo "   note: a writer exited with status $rc: $(head -c 300 "$dir"/w*.err)"

  ROWS+=("$(printf '%-9s %-7s %-8s %-8s %-18s %-28s %-10s %s' "$mode" "$journal" "$WRITERS" \
    "$commits" "$held/$samples" "$under" "$integrity" "$errors")")
  if [[ $mode == writelock ]]; then
    [[ $integrity == ok ]] || FAIL+=("$journal: integrity_check: $integrity")
    [[ $under == 0 ]] || FAIL+=("$journal: rows written under flock(1): $under")
    ((held > 0)) || FAIL+=("$journal: write lock never observed held on <db>.lock")
    ((after > 0)) || FAIL+=("$journal: writers had finished before the flock(1) job let go (no overlap)")
  fi
}

echo "sqlite-writelock demo — $(sqlite3 --version | cut -d' ' -f1), extension $SO"
T0=$(now)
for journal in WAL DELETE; do
  for mode in stock writelock; do run_case "$mode" "$journal"; done
done

echo
printf '%-9s %-7s %-8s %-8s %-18s %-28s %-10s %s\n' mode journal writers commits \
  "lock-held samples" "rows written under flock(1)" integrity "'database is locked' errors"
printf '%s\n' "${ROWS[@]}"
cat <<EOF

How to read it: stock SQLite never takes <db>.lock, so the probe never sees it held and a
flock(1) maintenance script (backup, migration) does not stop its writers. With writelock each
connection holds an exclusive flock on <db>.lock exactly while it is a writer, so the probe sees it
held and the flock(1) job excludes the writers (0 rows) — they wait via busy_timeout, then finish.
Expected commits: $((WRITERS * TX)) per run. Total time: $(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }') s.
EOF
if ((${#FAIL[@]})); then
  printf 'DEMO FAILED (writelock): %s\n' "${FAIL[@]}" >&2
  exit 1
fi
echo "OK: writelock held <db>.lock while writing, excluded writers under flock(1), integrity ok."
