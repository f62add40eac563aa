#!/usr/bin/env bash
# bench/run.sh - every benchmark, measured in one run on this machine.
#   (a) application insert speed with harmonylite's triggers vs without (ratio)
#   (b) end-to-end replicated rows/s node 1 -> nodes 2 and 3, next to bare SQLite,
#       and the CPU each process spent per row; (b'') the same for single-row
#       transactions
#   (c) commit -> visible lag p50/p99 at a fixed 1,000 txn/s
#       (b), (c) and (d) with JetStream replicas 3, then again with replicas 1
#   (d) commit -> visible lag of isolated writes from a long-lived connection,
#       with the fallback poll and (d') without it
#   (f) scattered updates on a 1,000,000-row table: rows/s, and the -wal file of
#       every node (peak and after the burst) next to bare SQLite's; (g) shuffled-id inserts
#   (e) with --big only: one 5,000,000-row transaction, integer and text keys:
#       time until replicated and the peak memory of every process (a few minutes,
#       a few GB of disk)
# Usage: bench/run.sh [--quick] [--big]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh release
cmake --build build --target bench_trigger bench_engine -j2 >/dev/null
secs=3; rows=200000; lag_s=10; isolated=200; big=0; scat_s=30; scat_rows=1000000
for arg in "$@"; do
    case $arg in
    --quick) secs=1; rows=50000; lag_s=3; isolated=60; scat_s=10; scat_rows=200000 ;;
    --big) big=1 ;;
    *) echo "usage: bench/run.sh [--quick] [--big]" >&2; exit 2 ;;
    esac
done
echo "== (a) trigger overhead on application inserts"
build/bench_trigger "$secs"
echo "== per node: capture and apply on one core, no NATS"
build/bench_engine "$rows" 1000
echo "== (b)(c)(d) 3-node cluster on loopback, JetStream replicas 3"
HARMONYLITE_BIN="$PWD/build/harmonylite" python3 bench/bench_cluster.py --rows "$rows" --seconds "$lag_s" \
    --isolated "$isolated"
echo "== (b)(c)(d) the same with JetStream replicas 1"
HARMONYLITE_BIN="$PWD/build/harmonylite" python3 bench/bench_cluster.py --rows "$rows" --seconds "$lag_s" \
    --isolated "$((isolated / 4))" --replicas 1
echo "== (f)(g) scattered writes and the WAL, 3-node cluster on loopback"
HARMONYLITE_BIN="$PWD/build/harmonylite" python3 bench/bench_scattered.py --seconds "$scat_s" --rows "$scat_rows"
if [ "$big" = 1 ]; then
    echo "== (e) one 5,000,000-row transaction, integer key then text key"
    HARMONYLITE_BIN="$PWD/build/harmonylite" python3 bench/big_txn.py --rows 5000000
    HARMONYLITE_BIN="$PWD/build/harmonylite" python3 bench/big_txn.py --rows 5000000 --text-key
fi
