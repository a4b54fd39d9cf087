#!/usr/bin/env bash
# scripts/demo.sh — `make demo`: sqlite-writelock in action, in under a minute.
#
# Part 1, a flock(1) job. For each journal mode (WAL, DELETE) the same workload runs twice, each
# in a fresh temp dir:
#   stock      plain `sqlite3` shells (no extension)
#   writelock  `sqlite3 -cmd '.load target/release/libwritelock' -cmd '.open DB'`
# Workload: $WRITERS sqlite3 processes started together, each doing $TX transactions
# `BEGIN IMMEDIATE; INSERT ...; COMMIT;` with `.timeout 10000`.
# Meanwhile, without disturbing them:
#   * a probe samples /proc/locks (no flock -n!) and counts samples in which a writer process
#     holds a FLOCK WRITE lock on <db>.lock;
#   * a "maintenance job" runs `flock <db>.lock sh -c '... sleep 0.3 ...'` (like a backup
#     script); every row records its insert time, so we count rows written while it held the lock.
#
# Part 2, the app bug. 6 writers, a reader and a maintenance job (target/release/torture_worker,
# from tests/bin/torture_worker.rs) share one WAL database for $MISUSE_SECS s, and every one of
# them also opens, reads and closes the database file beside its connection — the close() that
# silently drops the process's POSIX locks. Three variants: stock SQLite; `appflock`, stock plus
# the usual application fix (flock(LOCK_EX) on <db>.lock around every write transaction); and
# the extension. Witnesses: PRAGMA integrity_check, lost updates (commits the writers saw succeed
# vs the rows and counters in the database), 'database disk image is malformed' errors returned
# to the workers, and how many writers were inside a write transaction at once.
#
# It exits non-zero if a writelock run shows the extension is not doing its job (part 2: any
# damage). Stock and appflock damage is probabilistic and never fails the demo.
# Needs bash, sqlite3 (shell), util-linux flock(1) and timeout(1), coreutils and awk.
# Knobs: DEMO_PARTS ("flock appbug"), MISUSE_SECS (6), MISUSE_JOURNAL ("WAL"; "WAL DELETE" for
# both), MISUSE_SEED.
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


# ------------------------------------------------------------------------------------------------
# Part 2: the app bug. Every process of tests/bin/torture_worker.rs (writers, a reader, a
# maintenance job) opens the database file, reads 100 bytes and closes it beside its own
# connection, as a health check or a backup reading the header does. That close() drops every
# POSIX lock the process holds on the file, SQLite's included, without a word.

WORKER="$ROOT/target/release/torture_worker"
MISUSE_SECS=${MISUSE_SECS:-6}
MISUSE_JOURNAL=${MISUSE_JOURNAL:-WAL}
MISUSE_WRITERS=6

# The torture suite's schema, and a counter per writer.
SCHEMA="$(cat "$ROOT/tests/torture-schema.sql")
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < $MISUSE_WRITERS)
  INSERT INTO counters(worker, n) SELECT i, 0 FROM n;"

MROWS=()   # table rows of part 2
MNOTES=()  # the first integrity_check message of each damaged database
DAMAGED=() # variants that showed damage

# json_sum FIELD FILES...: the sum of a numeric field over the workers' JSON lines.
json_sum() { local f=$1; shift; cat "$@" | grep -o "\"$f\":[0-9]*" | awk -F: '{ n += $2 } END { print n + 0 }'; }

misuse_case() {  # misuse_case stock|appflock|writelock JOURNAL SEED
  local mode=$1 journal=$2 seed=$3 dir="$TMP/misuse-$1-$2" db id pids=() t0
  mkdir "$dir"; db="$dir/app.db"
  sqlite3 "$db" "PRAGMA journal_mode=$journal; BEGIN; $SCHEMA COMMIT;" >/dev/null
  printf '%-9s %-6s: %d writers, a reader, a maintenance job, %ss ... ' \
    "$mode" "$journal" "$MISUSE_WRITERS" "$MISUSE_SECS"
  t0=$(now)
  for ((id = 1; id <= MISUSE_WRITERS + 2; id++)); do
    local role=writer
    ((id == MISUSE_WRITERS + 1)) && role=reader
    ((id == MISUSE_WRITERS + 2)) && role=maintenance
    # busy_timeout 5 s; a worker still running 30 s after its deadline is stuck.
    timeout -s KILL $((${MISUSE_SECS%.*} + 30)) "$WORKER" "$role" --db "$db" --mode "$mode" \
      --secs "$MISUSE_SECS" --seed $(((seed << 8) + id)) --id "$id" --probe 1 \
      >"$dir/$role.$id.json" 2>"$dir/$role.$id.err" &
    pids+=($!)
  done
  local dead=0
  for id in "${pids[@]}"; do wait "$id" || dead=$((dead + 1)); done
  awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1fs\n", (b - a) / 1e6 }'

  # Checks, through plain sqlite3 (no extension) once every worker has exited.
  local integrity nmsg commits reads malformed lost=0 unverifiable=0 overlap w logged n missing
  integrity=$(sqlite3 "$db" 'PRAGMA integrity_check;' 2>&1 | grep -v '^\*\*\*' || true)
  nmsg=$(grep -c . <<<"$integrity" || true)
  if [[ $integrity != ok ]]; then
    MNOTES+=("$(printf '%-9s integrity_check: %s' "$mode" "$(head -n1 <<<"$integrity" | cut -c1-80)")")
    integrity="NOT ok ($nmsg)"
  fi
  commits=$(json_sum commits "$dir"/writer.*.json)
  reads=$(json_sum commits "$dir"/reader.*.json)
  malformed=$(json_sum malformed "$dir"/*.json)
  # Lost updates: a commit the writer saw succeed (logged after COMMIT returned) whose run row
  # is missing, or a counter holding fewer increments than the writer committed.
  # A table the damage made unreadable is not counted: "?" then.
  local tags_ok=1
  sqlite3 "$db" 'SELECT tag FROM runs NOT INDEXED;' 2>/dev/null | sort >"$dir/tags" || tags_ok=0
  for ((w = 1; w <= MISUSE_WRITERS; w++)); do
    touch "$dir/committed.$w"
    logged=$(wc -l <"$dir/committed.$w")
    missing=0
    ((tags_ok)) && missing=$(sort "$dir/committed.$w" | comm -23 - "$dir/tags" | wc -l)
    n=$(sqlite3 "$db" "SELECT n FROM counters NOT INDEXED WHERE worker = $w;" 2>/dev/null) || n=
    if [[ $n =~ ^[0-9]+$ ]]; then
      ((logged - n > missing)) && missing=$((logged - n))
    elif ((!tags_ok)); then
      unverifiable=1
    fi
    lost=$((lost + missing))
  done
  ((tags_ok)) || unverifiable=1
  ((unverifiable)) && lost="$lost+?"
  # Writers inside a write transaction at once, from the workers' out-of-band log.
  overlap=$(awk '/^\+/ { if (++now > max) max = now } /^-/ { now-- } END { print max + 0 }' \
    "$dir/overlap.log" 2>/dev/null || echo 0)

  local verdict=intact
  if [[ $integrity != ok || $lost != 0 || $malformed != 0 || $overlap -gt 1 || $dead != 0 ]]; then
    verdict=DAMAGED; DAMAGED+=("$mode")
  fi
  ((dead == 0)) || verdict+=" ($dead workers died or hung)"
  MROWS+=("$(printf '%-9s %-7s %7s %6s  %-12s %7s %9s %7s  %s' "$mode" "$journal" "$commits" \
    "$reads" "$integrity" "$lost" "$malformed" "$overlap" "$verdict")")
  if [[ $mode == writelock ]]; then
    [[ $integrity == ok ]] || FAIL+=("app bug, $journal: integrity_check: $integrity")
    [[ $lost == 0 ]] || FAIL+=("app bug, $journal: lost updates: $lost")
    [[ $malformed == 0 ]] || FAIL+=("app bug, $journal: 'malformed' errors: $malformed")
    ((overlap <= 1)) || FAIL+=("app bug, $journal: $overlap writers inside write transactions at once")
    ((dead == 0)) || FAIL+=("app bug, $journal: $dead workers hung or failed")
    ((commits >= 20)) || FAIL+=("app bug, $journal: only $commits commits")
  fi
}

misuse_part() {
  [[ -x $WORKER ]] || { echo "demo: $WORKER not found — run \`make demo\`." >&2; exit 1; }
  local seed=${MISUSE_SEED:-$((RANDOM * 32768 + RANDOM))} journal mode
  echo
  echo "Part 2 — the app bug: each process also opens and closes the database file (os.close(os.open(db)))"
  echo "while it writes or reads, as a health check or a backup reading the header does. seed $seed"
  for journal in $MISUSE_JOURNAL; do
    for mode in stock appflock writelock; do misuse_case "$mode" "$journal" "$seed"; done
  done
  echo
  printf '%-9s %-7s %7s %6s  %-12s %7s %9s %7s  %s\n' variant journal commits reads \
    integrity lost malformed writers verdict
  printf '%-9s %-7s %7s %6s  %-12s %7s %9s %s\n' "" "" "" "" check updates errors "at once"
  printf '%s\n' "${MROWS[@]}"
  ((${#MNOTES[@]} == 0)) || printf '%s\n' "${MNOTES[@]}"
  local hit=0
  [[ " ${DAMAGED[*]} " == *" stock "* ]] && hit=1
  cat <<EOF

lost updates: commits a writer saw succeed that the database lacks (+? : a table was unreadable).
malformed errors: 'database disk image is malformed' returned to the workers' queries.

How to read it: in every process the app bug's close() dropped SQLite's POSIX locks on the file.
  stock      writers wrote at once (writers at once > 1), and a connection closing found no other
             lock on the file, took itself for the last one, checkpointed and deleted the -wal
             and -shm that live connections were still using: corruption, lost commits.
  appflock   the app's flock on <db>.lock kept writers one at a time, but only writers: the
             close-time check above, and readers (in DELETE mode a reader reads pages a writer
             is rewriting), still rest on the POSIX locks the close() dropped.
  writelock  shadow locks on open file descriptions, which no close() elsewhere in the process
             cancels: integrity ok, no lost updates, no malformed reads.
The damage is probabilistic: it takes a close() landing inside another process's transaction.
On a 2-core machine stock and appflock showed it in most runs; a clean stock run means the race
did not hit this time, not that it is safe.
EOF
  ((hit)) || echo "(This time stock came through clean: run \`make demo\` again, or MISUSE_SECS=15.)"
}

DEMO_PARTS=${DEMO_PARTS:-"flock appbug"}
echo "sqlite-writelock demo — $(sqlite3 --version | cut -d' ' -f1), extension $SO"
T0=$(now)
if [[ " $DEMO_PARTS " == *" flock "* ]]; then
  echo "Part 1 — a flock(1) job on <db>.lock while writers run"
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
Expected commits: $((WRITERS * TX)) per run.
EOF
fi
if [[ " $DEMO_PARTS " == *" appbug "* ]]; then misuse_part; fi
echo "Total time: $(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }') s."
if ((${#FAIL[@]})); then
  printf 'DEMO FAILED (writelock): %s\n' "${FAIL[@]}" >&2
  exit 1
fi
OK="OK: writelock"
[[ " $DEMO_PARTS " == *" flock "* ]] && OK+=" held <db>.lock while writing, excluded writers under flock(1);"
[[ " $DEMO_PARTS " == *" appbug "* ]] && OK+=" kept its database intact under the app bug;"
echo "${OK%;}."
