#!/usr/bin/env bash
# run-cluster.sh - a local three-node harmonylite cluster on loopback.
#
#   examples/run-cluster.sh [--non-interactive]
#
# Creates examples/run/node-{1,2,3}.db, each with the same `books` table, starts
# one harmonylite per database (examples/node-N.yaml: embedded nats-server,
# JetStream replicas 3, logs in examples/run/node-N.log), waits until a write
# on node 1 reaches nodes 2 and 3, then shows a row inserted on node 1, an
# update made on node 2, and lone inserts from one sqlite3 shell kept open on
# node 3 (a long-lived connection, like an application's pool) arriving on the
# other nodes.
#
# On a terminal it then keeps the cluster running until Ctrl-C. With
# --non-interactive (or CI=true, or no terminal) it stops the nodes with
# SIGTERM and exits 0 when everything worked, non-zero otherwise.
#
# Environment: HARMONYLITE_BIN (default build/harmonylite),
#              HL_DEMO_TIMEOUT seconds to wait for startup/replication (default 90).
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

interactive=1
for arg in "$@"; do
    case "$arg" in
    --non-interactive) interactive=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run-cluster.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done
if [ "${CI:-}" = true ] || ! [ -t 0 ] || ! [ -t 1 ]; then
    interactive=0
fi

BIN=${HARMONYLITE_BIN:-build/harmonylite}
case "$BIN" in /*) ;; build/harmonylite) ;; *) BIN="$PWD/$BIN" ;; esac
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=examples/run
TIMEOUT=${HL_DEMO_TIMEOUT:-90}
NODES=(1 2 3)

die() {
    echo "run-cluster.sh: error: $*" >&2
    exit 1
}

[ -x "$BIN" ] || die "$BIN not found; build it with scripts/build.sh (or set HARMONYLITE_BIN)"
command -v sqlite3 >/dev/null || die "sqlite3 not found (scripts/install-deps.sh installs it)"
command -v nats-server >/dev/null || die "nats-server not found on PATH (scripts/install-deps.sh installs it)"

now_ms() { date +%s%3N; }

# sql DB SQL... - the sqlite3 shell, as an application would use it (waits on locks).
sql() {
    local db=$1
    shift
    sqlite3 -batch -cmd '.timeout 10000' "$db" "$@"
}

show() { sql "$1" -separator ' | ' "SELECT id, title, author, publication_year FROM books WHERE id = $2"; }

log_tails() {
    local n
    for n in "${NODES[@]}"; do
        echo "----- examples/run/node-$n.log (last 25 lines) -----" >&2
        tail -n 25 "$RUN/node-$n.log" >&2 2>/dev/null || true
    done
}

# Ports still taken by an earlier run would make the nodes fail in confusing ways.
for port in 14221 14222 14223 16221 16222 16223 18081 18082 18083; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "127.0.0.1:$port is already in use (is another demo cluster running?)"
    fi
done

create_db() {
    sql "$1" >/dev/null <<'EOF'
PRAGMA journal_mode = WAL;
CREATE TABLE books (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    author TEXT NOT NULL,
    publication_year INTEGER
);
INSERT INTO books (title, author, publication_year) VALUES
    ('The Hitchhiker''s Guide to the Galaxy', 'Douglas Adams', 1979),
    ('The Lord of the Rings', 'J.R.R. Tolkien', 1954),
    ('Harry Potter and the Sorcerer''s Stone', 'J.K. Rowling', 1997),
    ('The Catcher in the Rye', 'J.D. Salinger', 1951),
    ('To Kill a Mockingbird', 'Harper Lee', 1960),
    ('1984', 'George Orwell', 1949),
    ('The Great Gatsby', 'F. Scott Fitzgerald', 1925);
EOF
}

rm -rf "$RUN"
mkdir -p "$RUN"
for n in "${NODES[@]}"; do
    create_db "$RUN/node-$n.db"
done
echo "created $RUN/node-{1,2,3}.db with a books table (7 rows each)"

pids=()
stopped=0

# stop_nodes - SIGTERM every node, SIGKILL what is left after 30 s; returns
# non-zero when a node did not exit with status 0.
stop_nodes() {
    local pid rc=0 status i
    [ "$stopped" = 1 ] && return 0
    stopped=1
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for i in "${!pids[@]}"; do
        pid=${pids[$i]}
        for _ in $(seq 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "node $((i + 1)) did not stop within 30 s of SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        status=0
        wait "$pid" 2>/dev/null || status=$?
        if [ "$status" -ne 0 ]; then
            echo "node $((i + 1)) exited with status $status" >&2
            rc=1
        fi
    done
    return "$rc"
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$stopped" = 0 ] && [ "${#pids[@]}" -gt 0 ]; then
        echo "stopping the nodes..."
        stop_nodes || rc=$((rc == 0 ? 1 : rc))
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'echo; exit 130' INT
trap 'exit 143' TERM

# Each node in its own session: a Ctrl-C on the terminal reaches only this
# script, which then stops the nodes once, with SIGTERM (a second stop signal
# makes harmonylite exit at once).
launcher=()
if command -v setsid >/dev/null; then
    launcher=(setsid)
fi
for n in "${NODES[@]}"; do
    "${launcher[@]}" "$BIN" -config "examples/node-$n.yaml" >>"$RUN/node-$n.log" 2>&1 &
    pids+=("$!")
    echo "started node $n (pid $!), log: $RUN/node-$n.log"
done

# Wait for every node's "started" line.
deadline=$((SECONDS + TIMEOUT))
for n in "${NODES[@]}"; do
    until grep -Eq '(^|[[:space:]])INF started([[:space:]]|$)|"msg":"started"' "$RUN/node-$n.log"; do
        if ! kill -0 "${pids[$((n - 1))]}" 2>/dev/null; then
            log_tails
            die "node $n exited during startup (see the log above)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log_tails
            die "node $n did not start within ${TIMEOUT}s"
        fi
        sleep 0.2
    done
done
echo "all three nodes report started"

# wait_rows DB WHERE EXPECTED - waits until `count(*) FROM books WHERE ...` is EXPECTED.
wait_rows() {
    local db=$1 where=$2 want=$3 got
    while :; do
        got=$(sql "$db" "SELECT count(*) FROM books WHERE $where" 2>/dev/null || echo "?")
        [ "$got" = "$want" ] && return 0
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.02
    done
}

# A probe write shows that replication works end to end before the demo.
deadline=$((SECONDS + TIMEOUT))
probe="probe-$$-$(now_ms)"
sql "$RUN/node-1.db" "INSERT INTO books (title, author) VALUES ('$probe', 'run-cluster.sh')"
for n in 2 3; do
    wait_rows "$RUN/node-$n.db" "title = '$probe'" 1 || {
        log_tails
        die "a probe row written on node 1 did not reach node $n within ${TIMEOUT}s"
    }
done
sql "$RUN/node-1.db" "DELETE FROM books WHERE title = '$probe'"
for n in 2 3; do
    wait_rows "$RUN/node-$n.db" "title = '$probe'" 0 || {
        log_tails
        die "deleting the probe row on node 1 did not reach node $n within ${TIMEOUT}s"
    }
done
echo "replication works: a probe row written on node 1 reached nodes 2 and 3"

echo
echo "== INSERT on node 1 =="
deadline=$((SECONDS + TIMEOUT))
t0=$(now_ms)
id=$(sql "$RUN/node-1.db" "INSERT INTO books (title, author, publication_year) VALUES ('Dune', 'Frank Herbert', 1965); SELECT last_insert_rowid();")
echo "node 1: $(show "$RUN/node-1.db" "$id")"
for n in 2 3; do
    wait_rows "$RUN/node-$n.db" "id = $id" 1 || {
        log_tails
        die "the row inserted on node 1 did not reach node $n within ${TIMEOUT}s"
    }
    echo "node $n: $(show "$RUN/node-$n.db" "$id")   (arrived $(($(now_ms) - t0)) ms after the insert)"
done

echo
echo "== UPDATE on node 2 (every node accepts writes) =="
t0=$(now_ms)
sql "$RUN/node-2.db" "UPDATE books SET title = 'Dune Messiah', publication_year = 1969 WHERE id = $id"
echo "node 2: $(show "$RUN/node-2.db" "$id")"
for n in 1 3; do
    wait_rows "$RUN/node-$n.db" "id = $id AND title = 'Dune Messiah'" 1 || {
        log_tails
        die "the update made on node 2 did not reach node $n within ${TIMEOUT}s"
    }
    echo "node $n: $(show "$RUN/node-$n.db" "$id")   (arrived $(($(now_ms) - t0)) ms after the update)"
done

echo
echo "== INSERTs on node 3 from one long-lived connection, as an application with a connection pool =="
# One sqlite3 shell kept open for all of them: its commits leave no close event
# behind, and each one is alone (50-200 ms apart), so no later write helps.
coproc APP { sql "$RUN/node-3.db"; }
app_pid=$APP_PID app_in=${APP[1]} app_out=${APP[0]}
for i in 1 2 3; do
    sleep "$(printf '0.%03d' $((50 + RANDOM % 151)))"
    t0=$(now_ms)
    echo "INSERT INTO books (title, author) VALUES ('Pooled write $i', 'run-cluster.sh'); SELECT last_insert_rowid();" >&"$app_in"
    read -t "$TIMEOUT" -r id <&"$app_out" || die "the long-lived sqlite3 shell on node 3 did not answer"
    echo "node 3 (open connection): $(show "$RUN/node-3.db" "$id")"
    deadline=$((SECONDS + TIMEOUT))
    for n in 1 2; do
        wait_rows "$RUN/node-$n.db" "id = $id" 1 || {
            log_tails
            die "row $id inserted on node 3's open connection did not reach node $n within ${TIMEOUT}s"
        }
        echo "node $n: $(show "$RUN/node-$n.db" "$id")   (arrived $(($(now_ms) - t0)) ms after the insert)"
    done
done
exec {app_in}>&-
wait "$app_pid" || die "the long-lived sqlite3 shell on node 3 failed"

if [ "$interactive" = 0 ]; then
    echo
    echo "stopping the nodes (SIGTERM)..."
    if stop_nodes; then
        echo "demo finished: all nodes replicated and stopped cleanly"
        exit 0
    fi
    log_tails
    die "a node did not stop cleanly"
fi

trap 'echo; echo "stopping the nodes..."; if stop_nodes; then exit 0; else exit 1; fi' INT
cat <<EOF

The cluster is running. In another terminal, from $ROOT:

  write on any node:
    sqlite3 $RUN/node-1.db "INSERT INTO books (title, author) VALUES ('My book', 'Me')"
    sqlite3 $RUN/node-3.db "UPDATE books SET author = 'You' WHERE title = 'My book'"
  read on any node:
    sqlite3 $RUN/node-2.db "SELECT * FROM books ORDER BY id DESC LIMIT 3"
  health and metrics:
    curl -s http://127.0.0.1:18081/readyz; curl -s http://127.0.0.1:18081/metrics | head
  logs:
    tail -f $RUN/node-1.log

Press Ctrl-C to stop the cluster.
EOF
while :; do
    status=0
    wait -n "${pids[@]}" || status=$?
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            log_tails
            die "node $((i + 1)) exited unexpectedly (status $status)"
        fi
    done
done
