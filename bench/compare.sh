#!/usr/bin/env bash
# bench/compare.sh - the same cluster workloads against an older commit and this
# tree, in one run, so a change shows as a before/after ratio.
#
#   bench/compare.sh REV [--quick] [--runs N]
#
# REV (any commit, e.g. main or HEAD~3) is exported with `git archive` into a
# temporary directory and built there (scripts/build.sh release, harmonylite
# only); this tree is built as usual. Then the benchmarks of THIS tree
# (bench_cluster.py: (b) throughput, (c) lag; bench_scattered.py: (f)
# scattered updates and the WAL, (g) shuffled-id inserts, peak RSS) run
# against the old binary and the new one, alternating old/new N times
# (default 1), and a table prints each figure for both with new/old. The
# temporary directory is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bench/compare.sh REV [--quick] [--runs N]" >&2; exit 2; }
[ $# -ge 1 ] || usage
rev=$1
shift
quick=0
runs=1
while [ $# -gt 0 ]; do
    case $1 in
    --quick) quick=1 ;;
    --runs) shift; [ $# -gt 0 ] || usage; runs=$1 ;;
    *) usage ;;
    esac
    shift
done
old=$(git rev-parse --verify "$rev^{commit}")
tmp=$(mktemp -d "${TMPDIR:-/tmp}/hl-compare-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "== building $rev ($old) in $tmp/old"
mkdir "$tmp/old"
git archive "$old" | tar -x -C "$tmp/old"
(cd "$tmp/old" && scripts/build.sh release --target harmonylite >"$tmp/old-build.log" 2>&1) ||
    { tail -20 "$tmp/old-build.log"; exit 1; }
echo "== building this tree"
scripts/build.sh release --target harmonylite >"$tmp/new-build.log" 2>&1 || { tail -20 "$tmp/new-build.log"; exit 1; }

if [ "$quick" = 1 ]; then
    cluster_args=(--rows 50000 --seconds 3 --isolated 20)
    scattered_args=(--rows 200000 --seconds 10 --inserts 50000 --settle 12)
else
    cluster_args=(--rows 200000 --seconds 10 --isolated 60)
    scattered_args=(--rows 1000000 --seconds 30 --inserts 200000 --settle 15)
fi
for i in $(seq 1 "$runs"); do
    for side in old new; do
        if [ "$side" = old ]; then bin="$tmp/old/build/harmonylite"; else bin="$PWD/build/harmonylite"; fi
        echo "== run $i, $side: bench_cluster.py"
        HARMONYLITE_BIN="$bin" python3 bench/bench_cluster.py "${cluster_args[@]}" --json "$tmp/$side-cluster-$i.json"
        echo "== run $i, $side: bench_scattered.py"
        HARMONYLITE_BIN="$bin" python3 bench/bench_scattered.py "${scattered_args[@]}" \
            --json "$tmp/$side-scattered-$i.json"
    done
done

python3 - "$tmp" "$runs" "$rev" <<'EOF'
import json, statistics, sys
tmp, runs, rev = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def load(side, name):
    return [json.load(open(f"{tmp}/{side}-{name}-{i}.json")) for i in range(1, runs + 1)]
mib = 1 << 20
figures = [
    ("(b) replicated rows/s", "cluster", lambda r: r["throughput"]["replicated_rows_per_s"], True),
    ("(b) bare SQLite rows/s (same run)", "cluster", lambda r: r["bare_sqlite_rows_per_s"], True),
    ("(b) replicated / bare SQLite", "cluster",
     lambda r: r["throughput"]["replicated_rows_per_s"] / r["bare_sqlite_rows_per_s"], True),
    ("(b) CPU µs/row, all processes", "cluster", lambda r: sum(r["throughput"]["cpu_us_per_row"].values()), False),
    ("(b'') replicated single-row txn/s", "cluster", lambda r: r["small"]["replicated_rows_per_s"], True),
    ("(b'') bare SQLite single-row txn/s", "cluster", lambda r: r["bare_sqlite_small_txn_per_s"], True),
    ("(c) lag p50 ms", "cluster", lambda r: r["lag"]["p50_ms"], False),
    ("(c) lag p99 ms", "cluster", lambda r: r["lag"]["p99_ms"], False),
    ("(d) isolated p99 ms", "cluster", lambda r: r["isolated"]["p99_ms"], False),
    ("(f) application updates rows/s", "scattered", lambda r: r["updates"]["app_rows_per_s"], True),
    ("(f) replicated updates rows/s", "scattered", lambda r: r["updates"]["replicated_rows_per_s"], True),
    ("(f) sender CPU µs/row (capture, publish)", "scattered",
     lambda r: r["updates"]["sender_cpu_us_per_row"], False),
    ("(f) receiver CPU µs/row (fetch, apply)", "scattered",
     lambda r: r["updates"]["receiver_cpu_us_per_row"], False),
    ("(g) replicated inserts rows/s", "scattered", lambda r: r["inserts"]["replicated_rows_per_s"], True),
]
for node in ("node 1", "node 2", "node 3"):
    figures.append((f"(f) WAL peak MiB, {node}", "scattered", lambda r, n=node: r["wal_peak"][n] / mib, False))
    figures.append((f"(f) WAL after MiB, {node}", "scattered", lambda r, n=node: r["wal_final"][n] / mib, False))
for k in ("harmonylite 1", "harmonylite 2", "harmonylite 3"):
    figures.append((f"peak RSS MiB, {k}", "scattered", lambda r, k=k: r["peak_rss_kib"][k] / 1024, False))
    figures.append((f"RSS at rest MiB, {k}", "scattered", lambda r, k=k: r["rest_rss_kib"][k] / 1024, False))
print(f"\n{'figure (median of ' + str(runs) + ')':<40} {rev[:14]:>14} {'this tree':>14} {'new/old':>8}")
for name, bench, get, _higher_better in figures:
    o = statistics.median(get(r) for r in load("old", bench))
    n = statistics.median(get(r) for r in load("new", bench))
    ratio = f"{n / o:.2f}" if o else "-"
    prec = 2 if o < 10 else 1
    print(f"{name:<40} {o:>14,.{prec}f} {n:>14,.{prec}f} {ratio:>8}")
EOF
