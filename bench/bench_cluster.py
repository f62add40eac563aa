#!/usr/bin/env python3
"""bench_cluster.py - end-to-end replication benchmarks on a local 3-node cluster.

Measured in one run, on this machine, with real harmonylite and nats-server
processes (the e2e harness in tests/e2e/harness.py starts them):

  (b) throughput: node 1 commits ROWS rows in transactions of BATCH rows; the
      time from the first commit until every row is visible on nodes 2 and 3
      gives replicated rows/s. Bare SQLite insert speed for the same inserts,
      through the same Python driver, into a database without harmonylite, is
      reported next to it.
  (c) lag: node 1 commits single-row transactions at a fixed RATE per second
      for SECONDS; a separate process polls node 2 and notes when each row
      becomes visible. Reports p50/p99/max of commit -> visible.

Usage: bench/bench_cluster.py [--rows N] [--batch N] [--rate N] [--seconds N]
Prints a table and, with --json FILE, writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import harness  # noqa: E402

SCHEMA = "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT, c REAL);"


def rows_for(start: int, n: int):
    return [(start + i, start + i, "some text value of moderate size", (start + i) * 0.5) for i in range(n)]


def insert_batches(conn: sqlite3.Connection, total: int, batch: int) -> float:
    """Inserts total rows in transactions of batch rows; returns elapsed seconds."""
    t0 = time.perf_counter()
    done = 0
    while done < total:
        n = min(batch, total - done)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t(id, a, b, c) VALUES (?, ?, ?, ?)", rows_for(done + 1, n))
        conn.execute("COMMIT")
        done += n
    return time.perf_counter() - t0


def bare_sqlite(dirpath: Path, total: int, batch: int) -> float:
    db = dirpath / "bare.db"
    conn = harness.connect(db)
    conn.executescript(SCHEMA)
    el = insert_batches(conn, total, batch)
    conn.close()
    return total / el


def has_all(conn: sqlite3.Connection, total: int) -> bool:
    """True once all total rows are visible. Polls max(id), an index lookup, and
    confirms with count(*) only then: a count(*) of a 200,000-row table costs
    milliseconds, and polling with it every few ms on two nodes would take CPU
    from the very processes being measured."""
    if (conn.execute("SELECT max(id) FROM t").fetchone()[0] or 0) < total:
        return False
    return conn.execute("SELECT count(*) FROM t").fetchone()[0] >= total


def throughput(cluster, total: int, batch: int) -> dict:
    n1, n2, n3 = cluster.nodes
    conn = n1.connect()
    t0 = time.perf_counter()
    insert_batches(conn, total, batch)
    t_written = time.perf_counter() - t0
    conn.close()
    readers = {n.id: sqlite3.connect(f"file:{n.db_path}?mode=ro", uri=True, timeout=10) for n in (n2, n3)}
    done = {}
    deadline = time.monotonic() + 600
    while len(done) < 2 and time.monotonic() < deadline:
        for n in (n2, n3):
            if n.id not in done and has_all(readers[n.id], total):
                done[n.id] = time.perf_counter() - t0
        time.sleep(0.005)
    for r in readers.values():
        r.close()
    if len(done) < 2:
        raise SystemExit(f"rows did not replicate within 600 s: {done}")
    slowest = max(done.values())
    return {"rows": total, "batch": batch, "write_s": t_written, "replicated_s": slowest,
            "replicated_rows_per_s": total / slowest}


def _poller(path: str, first_id: int, last_id: int, out: mp.Queue) -> None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    seen = {}
    cur = first_id - 1
    deadline = time.monotonic() + 120
    while cur < last_id and time.monotonic() < deadline:
        row = conn.execute("SELECT max(id) FROM t").fetchone()[0] or 0
        if row > cur:
            now = time.time()
            for i in range(cur + 1, row + 1):
                seen[i] = now
            cur = row
        else:
            time.sleep(0.0002)
    out.put(seen)


def lag(cluster, rate: int, seconds: float, start_id: int) -> dict:
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    total = int(rate * seconds)
    q: mp.Queue = mp.Queue()
    p = mp.Process(target=_poller, args=(str(n2.db_path), start_id, start_id + total - 1, q))
    p.start()
    time.sleep(0.5)
    conn = n1.connect()
    commits = {}
    t0 = time.perf_counter()
    for i in range(total):
        target = t0 + i / rate
        d = target - time.perf_counter()
        if d > 0:
            time.sleep(d)
        rid = start_id + i
        conn.execute("INSERT INTO t(id, a, b, c) VALUES (?, ?, 'lag', 0)", (rid, rid))
        commits[rid] = time.time()
    achieved = total / (time.perf_counter() - t0)
    conn.close()
    seen = q.get(timeout=180)
    p.join()
    lags = sorted((seen[i] - commits[i]) * 1000.0 for i in commits if i in seen)
    missing = total - len(lags)
    if not lags:
        raise SystemExit("no row became visible on node 2")

    def pct(p_):
        return lags[min(len(lags) - 1, int(p_ * len(lags)))]

    return {"rate": rate, "achieved_rate": achieved, "txns": total, "missing": missing,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": lags[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    binary = harness.harmonylite_binary()
    if not binary.exists():
        raise SystemExit(f"{binary} not found: build first (scripts/build.sh release)")
    with tempfile.TemporaryDirectory(prefix="hl-bench-") as tmp:
        root = Path(tmp)
        bare = bare_sqlite(root, args.rows, args.batch)
        cluster = harness.Cluster(binary, root / "cluster", settings={"http": {"bind": ""}})
        cluster.init_databases(SCHEMA)
        try:
            cluster.start()
            tp = throughput(cluster, args.rows, args.batch)
            lg = lag(cluster, args.rate, args.seconds, args.rows + 1)
        finally:
            cluster.stop()
    res = {"bare_sqlite_rows_per_s": bare, "throughput": tp, "lag": lg}
    print(f"(b) replicated node 1 -> nodes 2 and 3: {tp['replicated_rows_per_s']:,.0f} rows/s "
          f"({tp['rows']:,} rows, {tp['batch']} rows/txn); bare SQLite insert: {bare:,.0f} rows/s; "
          f"ratio {tp['replicated_rows_per_s'] / bare:.2f}")
    print(f"(c) commit -> visible on node 2 at {lg['achieved_rate']:.0f} txn/s for {lg['txns']} txns: "
          f"p50 {lg['p50_ms']:.1f} ms, p99 {lg['p99_ms']:.1f} ms, max {lg['max_ms']:.1f} ms"
          f"{'' if not lg['missing'] else ', missing ' + str(lg['missing'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
